"""The fleet's own broker URL as an MQTT client config.

Why its own module: the publisher (built in `fleet.components`) and revocation
(`fleet.devices.revocation`, which ends a revoked device's session) both connect with the
fleet's login, and revocation cannot import the composition root.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from agent.transport.mqtt_config import MqttConfig
from fleet.errors import FleetInputError


def broker_config(url: str, client_id: str, password: str | None = None) -> MqttConfig:
    """`mqtt://[user[:pass]@]host[:port]` or `mqtts://...` to an `MqttConfig`; `password` (from the
    environment or a file, see `FleetSettings`) is used instead of one in the URL. Raises FleetInputError."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise FleetInputError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        return MqttConfig(host=parts.hostname, port=port, client_id=client_id,
                          username=unquote(parts.username) if parts.username else None,
                          password=password or (unquote(parts.password) if parts.password else None),
                          tls=parts.scheme == "mqtts", reconnect_max_s=5.0)
    except ValueError as exc:
        raise FleetInputError(f"broker URL {url!r}: {exc}") from None
