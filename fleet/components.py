"""The components `edgefleet fleet serve` runs beside the API, and the trust bootstrap.

`build_components(settings, store, ...)` returns, in start order:

1. the MQTT publisher (only when a broker is given): serves the TUF repository in chunks,
   publishes director documents, and hands reported states to the inventory
   (`store.devices.on_reported`) and to the controller, events to the controller, and
   telemetry to the telemetry ingest;
2. the telemetry ingest's store (flushed and closed at stop) whose merged windows feed the
   rollout gates (`TelemetryMetrics`);
   then the drift monitor (`fleet/telemetry/monitor.py`), which times ingest, evaluates
   closed windows for drift (alerts, retraining triggers, Prometheus gauges) and gives the
   gates their drift score;
3. the `RolloutController`, then the A/B `ExperimentDriver`;
4. the `TimestampRefresher`, which re-signs `timestamp.json` well before it expires (a
   repository nobody touches would otherwise freeze every device after a day) and
   publishes it retained.

`ensure_trust(settings)` creates the keys and the TUF repository under the data directory on
first start (root: 2 of 3 keys; move them offline afterwards, see docs/trust.md).

Errors: `broker_config` raises FleetInputError for a bad URL; `build_components` raises
FleetMisuseError when keys are unreadable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from agent.logs import log_event
from agent.transport.mqtt_client import MqttConfig
from fleet.db.store import Store
from fleet.delivery.dedupe import EventDeduper
from fleet.delivery.publisher import Publisher
from fleet.devices.revocation import RevokedFilter
from fleet.errors import FleetError, FleetInputError
from fleet.registry.publish import REPO_LOCK
from fleet.rollouts.controller import ControllerConfig, RolloutController
from fleet.rollouts.experiments import ExperimentDriver
from fleet.rollouts.gates import MetricsSource, TelemetryMetrics
from fleet.service import Component
from fleet.settings import FleetSettings
from fleet.telemetry.monitor import build_drift_monitor
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository

logger = logging.getLogger("edgefleet.fleet.components")


@dataclass(frozen=True)
class ServeConfig:
    """Periods of the background components (seconds)."""

    controller_tick_s: float = 0.5
    timestamp_refresh_s: float = 6 * 3600.0  # the timestamp expires after a day by default
    root_keys: int = 3
    root_threshold: int = 2
    telemetry_window_s: float = 60.0  # merged telemetry window (shorter in demos and tests)

    def __post_init__(self) -> None:
        if not 1 <= self.timestamp_refresh_s <= 12 * 3600:
            raise FleetInputError("timestamp_refresh_s must be within 1 s .. 12 h (timestamp lives 1 day)")


def broker_config(url: str, client_id: str) -> MqttConfig:
    """`mqtt://[user:pass@]host[:port]` or `mqtts://...` to an `MqttConfig`. Raises FleetInputError."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise FleetInputError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        return MqttConfig(host=parts.hostname, port=port, client_id=client_id,
                          username=unquote(parts.username) if parts.username else None,
                          password=unquote(parts.password) if parts.password else None,
                          tls=parts.scheme == "mqtts", reconnect_max_s=5.0)
    except ValueError as exc:
        raise FleetInputError(f"broker URL {url!r}: {exc}") from None


def ensure_trust(settings: FleetSettings, config: ServeConfig | None = None) -> tuple[KeyStore, Repository]:
    """Open the key store and TUF repository under the data directory, creating them if absent."""
    cfg = config or ServeConfig()
    keystore = KeyStore(settings.keys_dir)
    repo = Repository(settings.repo_dir, keystore)
    if not repo.initialized:
        repo.init(root_threshold=cfg.root_threshold, root_keys=cfg.root_keys)
        log_event(logger, "fleet.trust_initialised", repo=str(settings.repo_dir))
    return keystore, repo


class PublisherComponent:
    """`Publisher` as a service component (it already has start/stop)."""

    name = "publisher"

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def start(self) -> None:
        self.publisher.start()
        for name in ("root.json", "timestamp.json"):
            try:
                self.publisher.publish_metadata(name)
            except FleetError as exc:
                log_event(logger, "fleet.metadata_publish_failed", logging.WARNING, name=name, error=str(exc))

    def stop(self) -> None:
        self.publisher.stop()


class TimestampRefresher:
    """Re-sign the TUF timestamp every `interval_s` (and once at start if it is old)."""

    name = "timestamp-refresher"

    def __init__(self, repo: Repository, interval_s: float, publisher: Publisher | None = None) -> None:
        self.repo = repo
        self.interval_s = interval_s
        self.publisher = publisher
        self.refreshed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> int:
        """One refresh (and publish); returns the new timestamp version."""
        with REPO_LOCK:
            version = self.repo.refresh_timestamp()
        self.refreshed += 1
        if self.publisher is not None:
            try:
                self.publisher.publish_metadata("timestamp.json")
            except FleetError as exc:
                log_event(logger, "fleet.timestamp_publish_failed", logging.WARNING, error=str(exc))
        return version

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="timestamp-refresher", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # keep trying: an expired timestamp freezes the whole fleet
                logger.exception("timestamp refresh failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class TelemetryComponent:
    """The telemetry ingest store: written from the publisher thread, flushed every `flush_s`
    (so readers with their own connection, such as the experiment routes, see recent windows)
    and closed at stop."""

    name = "telemetry-ingest"

    def __init__(self, path: Path, flush_s: float = 5.0, window_s: float = 60.0) -> None:
        from fleet.telemetry.ingest import IngestConfig, TelemetryStore

        self.telemetry = TelemetryStore(path, IngestConfig(window_s=window_s))
        self.flush_s = flush_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ingest(self, device_id: str, payload: bytes) -> None:
        self.telemetry.ingest(payload)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="telemetry-flush", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.telemetry.flush()
            except Exception:
                logger.exception("telemetry flush failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.telemetry.close()


def build_components(settings: FleetSettings, store: Store, with_broker: bool,
                     config: ServeConfig | None = None,
                     clock: Callable[[], float] | None = None) -> list[Component]:
    """Everything `fleet serve` runs beside the API, in start order (see the module docstring)."""
    cfg = config or ServeConfig()
    keystore, repo = ensure_trust(settings, cfg)
    signer = DirectorSigner(keystore, settings.data_dir / "director")
    components: list[Component] = []
    publisher: Publisher | None = None
    metrics: MetricsSource | None = None
    telemetry = TelemetryComponent(settings.data_dir / "telemetry.db", window_s=cfg.telemetry_window_s)
    monitor = build_drift_monitor(settings, store, telemetry.telemetry, clock)  # alerts, triggers, gauges
    metrics = TelemetryMetrics(telemetry.telemetry, drift=monitor.drift_score)
    if with_broker:
        publisher = Publisher(broker_config(settings.broker_url, f"fleet-{settings.port}"),
                              settings.topic_prefix, settings.repo_dir)
        components.append(PublisherComponent(publisher))
    components.append(telemetry)
    components.append(monitor)
    kwargs = {"clock": clock} if clock is not None else {}
    controller = RolloutController(store, repo, signer, publisher,
                                   config=ControllerConfig(tick_s=cfg.controller_tick_s), metrics=metrics,
                                   **kwargs)
    if publisher is not None:
        publisher.on_reported(store.devices.on_reported)
        publisher.on_reported(controller.on_reported)
        # Events and telemetry from revoked devices (in flight, or before the broker reload) are
        # dropped and counted; reports are refused by `store.devices.on_reported` itself.
        # Agents send events at least once: a redelivery (same device and seq) is dropped first.
        publisher.on_event(EventDeduper(RevokedFilter(store, controller.on_event, "event")))
        publisher.on_telemetry(RevokedFilter(store, monitor.ingest, "telemetry"))  # timed ingest
    components.append(controller)
    components.append(ExperimentDriver(store, repo, signer, publisher, tick_s=cfg.controller_tick_s * 2))
    components.append(TimestampRefresher(repo, cfg.timestamp_refresh_s, publisher))
    return components
