"""Revoking a device end to end: store, broker, retained desired state, inbound traffic.

`revoke_device` is what `POST /v1/devices/{id}/revoke` runs: mark the device revoked
(audited), rewrite the device CRL (a certificate device's serial joins it,
`fleet/devices/certificates.py`) and the password file and reload the broker
(`fleet/devices/broker_reload.py`), and
clear the device's retained `desired` topic so no director document waits there for it. For a
certificate device it then ends the device's MQTT session (`end_session`): Mosquitto re-reads
the CRL on reload but keeps an open TLS session (measured with 2.0.11), so the fleet connects
with the device's client id, which makes the broker close the device's connection (a client id
is held by one connection), with a clean start and no session expiry, which drops the device's
persistent session; its reconnect then fails the handshake against the new CRL.
Each step after the store's is reported back instead of raised, because the revocation
itself is already durable and the operator needs to see which parts the broker applied.

`RevokedFilter` guards the publisher callbacks (telemetry, events): a message that was in
flight, or sent before the broker reload, from a revoked device is dropped and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from agent.errors import EdgefleetError
from agent.logs import log_event
from agent.transport.mqtt_client import MqttTransport
from fleet.delivery.broker_url import broker_config
from fleet.devices.broker_reload import BrokerReload, apply_broker_credentials
from fleet.devices.certificates import write_crl
from fleet.devices.inventory import Device
from fleet.errors import FleetError
from fleet.rollouts.controller_ports import DesiredPublisher
from fleet.settings import FleetSettings
from fleet.store import Store

logger = logging.getLogger("edgefleet.fleet.revocation")
T = TypeVar("T")


@dataclass(frozen=True)
class Revocation:
    """What a revocation did beyond the store: broker reload and retained-document clearing."""

    device: Device
    broker: BrokerReload
    desired_cleared: bool
    desired_detail: str
    session_ended: bool = False
    session_detail: str = "not needed (the broker reload ends a password device's session)"

    def to_dict(self) -> dict[str, Any]:
        return {**self.device.to_dict(), "broker_reloaded": self.broker.reloaded,
                "broker_detail": self.broker.detail, "desired_cleared": self.desired_cleared,
                "desired_detail": self.desired_detail, "session_ended": self.session_ended,
                "session_detail": self.session_detail}


def clear_desired(publisher: DesiredPublisher | None, device_id: str) -> tuple[bool, str]:
    """Publish an empty retained payload on the device's desired topic; never raises."""
    if publisher is None:
        return False, "no publisher running (service started without a broker)"
    try:
        topic = publisher.publish_desired(device_id=device_id, document=b"")
    except FleetError as exc:
        log_event(logger, "fleet.revocation.clear_failed", logging.WARNING, device=device_id, error=str(exc))
        return False, f"could not clear the retained desired document: {exc}"
    return True, f"cleared retained {topic}"


def end_session(settings: FleetSettings, device_id: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """Take over `device_id`'s MQTT client id with the fleet's login, then leave: the broker
    closes the device's connection and drops its session. Never raises."""
    password = settings.broker_password.get_secret_value() if settings.broker_password else None
    try:
        config = msgspec.structs.replace(broker_config(settings.broker_url, device_id, password),
                                         clean_start=True, session_expiry_s=0, connect_timeout_s=timeout_s)
        transport = MqttTransport(config)
    except (EdgefleetError, ValueError) as exc:
        return False, f"cannot end the session: {exc}"
    try:
        transport.connect(timeout_s)
    except EdgefleetError as exc:
        log_event(logger, "fleet.revocation.session_not_ended", logging.WARNING, device=device_id,
                  error=str(exc))
        return False, f"could not end the device's broker session: {exc}"
    finally:
        transport.close()
    return True, f"took over client id {device_id} on {config.host}:{config.port} (its connection is closed)"


def revoke_device(store: Store, settings: FleetSettings, device_id: str, actor: str, reason: str = "",
                  publisher: DesiredPublisher | None = None) -> Revocation:
    """Revoke `device_id`, apply it at the broker and clear its retained desired document.

    Raises NotFound, Conflict (already revoked) from the store, OSError when the password
    file or CRL cannot be written, FleetMisuseError when the device CA is unreadable.
    Broker-reload and publish failures are returned in the result.
    """
    device = store.devices.revoke(device_id, actor, reason)
    if device.cert_serial is not None:
        write_crl(store, settings)  # before the reload below, which makes Mosquitto re-read it
    broker = apply_broker_credentials(store, settings)
    cleared, detail = clear_desired(publisher, device_id)
    revocation = Revocation(device, broker, cleared, detail)
    if device.cert_serial is not None:
        # Only with a running publisher: the fleet then has a broker login to end the session with.
        ended, why = end_session(settings, device_id) if publisher is not None else (
            False, "no publisher running (service started without a broker): the device's open session "
                   "lasts until it drops; its reconnect is refused")
        revocation = Revocation(device, broker, cleared, detail, ended, why)
    log_event(logger, "fleet.revocation.done", device=device_id, broker_reloaded=broker.reloaded,
              desired_cleared=cleared, session_ended=revocation.session_ended)
    return revocation


class RevokedFilter(Generic[T]):
    """Publisher callback wrapper: passes `(device_id, payload)` on unless the device is revoked.

    Unknown devices pass (the broker's ACL already confines them to their own topics, and
    tests feed synthetic devices); revoked ones are dropped, logged and counted in `refused`.
    The set of revoked ids is read at most every `refresh_s` (one query instead of one per
    message: at thousands of reports a second that query was a fifth of an ingest worker's
    time), so a revocation reaches this filter within `refresh_s`; the broker's reload, which
    disconnects the device, is the primary cut-off (`docs/security.md`).
    """

    def __init__(self, store: Store, callback: Callable[[str, T], None], kind: str,
                 refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.callback = callback
        self.kind = kind
        self.refused = 0
        self.refresh_s = refresh_s
        self.clock = clock
        self._revoked: frozenset[str] = frozenset()
        self._read_at: float | None = None

    def _is_revoked(self, device_id: str) -> bool:
        now = self.clock()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            self._revoked, self._read_at = self.store.devices.revoked_ids(), now
        return device_id in self._revoked

    def __call__(self, device_id: str, payload: T) -> None:
        revoked = self._is_revoked(device_id)
        if revoked:
            self.refused += 1
            log_event(logger, "fleet.revocation.refused", logging.WARNING, device=device_id, kind=self.kind,
                      refused=self.refused)
            return
        self.callback(device_id, payload)
