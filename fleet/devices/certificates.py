"""The device CRL the broker reads: written from the inventory, kept fresh, reloaded with the broker.

Mosquitto checks a client certificate against `crlfile` (the mutual-TLS listener in
packaging/mosquitto/mosquitto.conf) and re-reads it on SIGHUP (measured with 2.0.11 in
tests/fleet/devices/test_device_certificates.py), like the password file. So a revocation
rewrites the CRL before the broker reload that `fleet.devices.revocation.revoke_device` does.

OpenSSL refuses every client certificate once the CRL's next update has passed, which would
lock the whole certificate fleet out. `CrlRefresher` therefore re-signs it at start and then
every half of `device_crl_days` (at start only when the file is that old: a SIGHUP at every
fleet start would be noise), and reloads the broker each time.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.logs import log_event
from fleet.devices.broker_reload import reload_broker
from fleet.errors import FleetMisuseError
from fleet.periodic import PeriodicRunner
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.trust.device_ca import DeviceCA

logger = logging.getLogger("edgefleet.fleet.certificates")
_ISO = "%Y-%m-%dT%H:%M:%S.%fZ"


def _when(text: str | None) -> datetime:
    try:
        return datetime.strptime(text or "", _ISO).replace(tzinfo=UTC)
    except ValueError:
        return datetime.now(UTC)


def write_crl(store: Store, settings: FleetSettings) -> Path | None:
    """Rewrite the CRL from the revoked certificate devices; None when the fleet has no device CA
    (a data directory from before certificates, and no CSR enrollment possible there either).

    Raises FleetMisuseError (CA unreadable) and OSError (file not writable).
    """
    if not DeviceCA.exists(settings.device_ca_dir):
        return None
    ca = DeviceCA.open(settings.device_ca_dir)
    revoked = [(serial, _when(at)) for serial, at in store.devices.revoked_certificates()]
    path = ca.write_crl(revoked, settings.device_crl_days * 86400.0)
    log_event(logger, "fleet.crl.written", path=str(path), revoked=len(revoked))
    return path


class CrlRefresher:
    """Re-sign the CRL well before its next update, and reload the broker (a service component)."""

    name = "crl-refresher"

    def __init__(self, store: Store, settings: FleetSettings) -> None:
        self.store = store
        self.settings = settings
        self.period_s = settings.device_crl_days * 86400.0 / 2
        self._runner = PeriodicRunner(logger)
        self._runner.add(self.name, self.refresh, self.period_s)

    def due(self) -> bool:
        """Whether the CRL on disk is missing or older than half its horizon."""
        try:
            return time.time() - (self.settings.device_ca_dir / "crl.pem").stat().st_mtime > self.period_s
        except FileNotFoundError:
            return DeviceCA.exists(self.settings.device_ca_dir)

    def refresh(self) -> None:
        try:
            if write_crl(self.store, self.settings) is not None:
                reload_broker(self.settings)
        except (FleetMisuseError, OSError) as exc:  # retried next period; the old CRL stays in force
            log_event(logger, "fleet.crl.refresh_failed", logging.WARNING, error=str(exc))

    def start(self) -> None:
        if self.due():
            self.refresh()
        self._runner.start()

    def stop(self) -> None:
        self._runner.stop()
