"""Speak as a device in tests: one Ed25519 report key per fake device, registered with the fleet.

Every test that publishes reported state, events or telemetry for a device to a fleet that
checks signatures (`fleet.delivery.report_verify`) signs through this helper, never with a copy
of the signing code: `DeviceKey.props(kind, payload)` are the MQTT user properties to publish
with, `register(store)` registers the public half, `install(state_dir)` puts the private key
where a real agent (`agent.daemon.report_signer`) finds it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as Properties_

from agent.contract.report_auth import HEADER, new_device_key, sign_report
from agent.daemon.report_signer import KEY_FILE
from agent.durable_io import write_durably
from fleet.errors import NotFound
from fleet.store import Store

Properties = tuple[tuple[str, str], ...]


@dataclass
class DeviceKey:
    """A fake device's report key and counter (starting at 1, strictly increasing)."""

    device_id: str
    private: bytes = b""
    public: bytes = b""
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        if not self.private:
            self.private, self.public = new_device_key()

    def header(self, kind: str, payload: bytes, counter: int | None = None,
               device_id: str | None = None) -> str:
        """The `efsig` value (`counter`/`device_id` override the next counter and own id: attacks)."""
        n = next(self._counter) if counter is None else counter
        return sign_report(self.private, kind, device_id or self.device_id, n, payload)

    def props(self, kind: str, payload: bytes, counter: int | None = None,
              device_id: str | None = None) -> Properties:
        """User properties carrying the signature of `payload` as `kind` (`reported`, `events`, ...)."""
        return ((HEADER, self.header(kind, payload, counter, device_id)),)

    def paho_properties(self, kind: str, payload: bytes) -> Properties_:
        """The same as paho PUBLISH properties, for tests that publish with a raw paho client."""
        props = Properties_(PacketTypes.PUBLISH)
        props.UserProperty = list(self.props(kind, payload))
        return props

    def register(self, store: Store, actor: str = "test") -> DeviceKey:
        store.report_keys.register(self.device_id, self.public, actor, audited=False)
        return self

    def install(self, state_dir: Path) -> DeviceKey:
        """Write the private key into an agent's state dir (0600), as `agent enroll` does."""
        state_dir.mkdir(parents=True, exist_ok=True)
        write_durably(state_dir / KEY_FILE, self.private, mode=0o600)
        return self


def enroll_keys(store: Store, device_ids: list[str],
                labels: dict[str, str] | None = None) -> dict[str, DeviceKey]:
    """Create each device (if new) in `store` and register a fresh report key; the keys by id."""
    keys = {}
    for dev in device_ids:
        try:
            store.devices.get(dev)
        except NotFound:
            store.devices.create(dev, dict(labels or {}), {}, dev, "$7$x", "test")
        keys[dev] = DeviceKey(dev).register(store)
    return keys
