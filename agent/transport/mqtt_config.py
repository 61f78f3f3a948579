"""`MqttConfig`: the broker connection settings of `agent.transport.mqtt_client.MqttTransport`.

Kept apart from the client because the agent's config file, the fleet's broker URL and the
simulators build it without opening a connection. Every limit is explicit (sizes in bytes, times
in seconds) and checked at construction, so a bad setting fails where it is read rather than as
a connection that misbehaves later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from agent.contract.protocol import validate_id
from agent.contract.strict import Meta, StrictStruct
from agent.errors import MisuseError


class MqttConfig(StrictStruct, frozen=True, kw_only=True):
    """Broker connection settings with explicit limits (sizes in bytes, times in seconds).

    Invalid settings raise `agent.contract.strict.ValidationError` (a `ValueError`) at
    construction. `repr()` masks the password.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None  # client certificate (per-device identity)
    key_file: Path | None = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, Meta(ge=0, le=2**32 - 1)] = 3600
    clean_start: bool = False
    connect_timeout_s: Annotated[float, Meta(gt=0, le=300)] = 10.0
    max_message_bytes: Annotated[int, Meta(ge=1024, le=256 * 1024 * 1024)] = 256 * 1024
    reconnect_min_s: Annotated[float, Meta(gt=0, le=60)] = 0.2
    reconnect_max_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    max_inflight: Annotated[int, Meta(ge=1, le=65535)] = 20
    max_pending_requests: Annotated[int, Meta(ge=1, le=100_000)] = 1024

    def _check(self) -> None:
        try:
            validate_id(self.client_id, "client id")
        except MisuseError as exc:
            raise ValueError(str(exc)) from None
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if (self.cert_file or self.ca_file) and not self.tls:
            raise ValueError("ca_file/cert_file need tls=true")

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={'**********' if name == 'password' and self.password else repr(getattr(self, name))}"
            for name in self.__struct_fields__
        )
        return f"MqttConfig({fields})"
