"""The composition root of `edgefleet fleet serve`: every collaborator built once, and the trust
bootstrap.

`build_components(settings, store, ...)` builds each collaborator exactly once (key store, TUF
repository, director signer, publisher, telemetry store, alert manager, drift monitor, rollout
controller, experiment driver) and returns them as `FleetParts`: the API gets its share
(`FleetParts.api`, handed to `create_app` by `FleetService`) and the components get theirs as
constructor arguments. Nothing is looked up later among running components. The components, in
start order:

1. the MQTT publisher (only when a broker is given): serves the TUF repository in chunks,
   publishes director documents, and hands reported states to the inventory
   (`store.devices.on_reported`) and to the controller, events to the controller, and
   telemetry to the telemetry ingest;
2. the telemetry ingest's store (flushed periodically, closed at stop) whose merged windows
   feed the rollout gates (`TelemetryMetrics`);
   then the drift monitor (`fleet/telemetry/monitor.py`), which times ingest, evaluates
   closed windows for drift (alerts, retraining triggers, Prometheus gauges) and gives the
   gates their drift score;
3. the `RolloutController`, then the A/B `ExperimentDriver`;
4. the `TimestampRefresher`, which re-signs `timestamp.json` well before it expires (a
   repository nobody touches would otherwise freeze every device after a day) and
   publishes it retained.

The periodic work (timestamp refresh, telemetry flush, drift evaluation) runs as jobs of
`fleet.periodic.PeriodicRunner`.

`ensure_trust(settings)` creates the keys and the TUF repository under the data directory on
first start (root: 2 of 3 keys; move them offline afterwards, see docs/trust.md).

Errors: `broker_config` and `ServeConfig` raise `FleetInputError` for a bad URL or period;
`ensure_trust` and `build_components` raise `FleetMisuseError` when keys are unreadable or the
alert database cannot be opened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from agent.logs import log_event
from agent.transport.mqtt_client import MqttConfig
from fleet.api.deps import ApiCollaborators
from fleet.delivery.dedupe import EventDeduper
from fleet.delivery.publisher import Publisher
from fleet.devices.revocation import RevokedFilter
from fleet.errors import FleetError, FleetInputError
from fleet.periodic import PeriodicRunner
from fleet.registry.deltas import DeltaCatalog, DeltaPolicy
from fleet.registry.publish import REPO_LOCK
from fleet.rollouts.controller import ControllerConfig, RolloutController
from fleet.rollouts.experiments import ExperimentDriver
from fleet.rollouts.gates import TelemetryMetrics
from fleet.service import Component
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.alerts import AlertManager
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from fleet.telemetry.monitor import DriftMonitor, build_drift_monitor
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
    delta_bases: int | None = None  # deltas from the N most common running versions (None: settings')

    def __post_init__(self) -> None:
        if not 1 <= self.timestamp_refresh_s <= 12 * 3600:
            raise FleetInputError("timestamp_refresh_s must be within 1 s .. 12 h (timestamp lives 1 day)")


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


def ensure_trust(settings: FleetSettings, config: ServeConfig | None = None) -> tuple[KeyStore, Repository]:
    """Open the key store and TUF repository under the data directory, creating them if absent.

    Raises `FleetMisuseError` (keys unreadable or incomplete)."""
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
    """Re-sign the TUF timestamp every `interval_s` (job `timestamp-refresher` of its runner)."""

    name = "timestamp-refresher"

    def __init__(self, repo: Repository, interval_s: float, publisher: Publisher | None = None) -> None:
        self.repo = repo
        self.interval_s = interval_s
        self.publisher = publisher
        self.refreshed = 0
        # a failed refresh is logged and retried next period: an expired timestamp freezes the fleet
        self._runner = PeriodicRunner(logger)
        self._runner.add(self.name, self.refresh, interval_s)

    def refresh(self) -> int:
        """One refresh (and publish); returns the new timestamp version.

        Raises what `Repository.refresh_timestamp` raises (`FleetMisuseError`: not initialised,
        keys missing); a failed publish is logged, not raised."""
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
        self._runner.start()

    def stop(self) -> None:
        self._runner.stop()


class TelemetryComponent:
    """The telemetry ingest store as a component: written from the publisher thread, flushed
    every `flush_s` (job `telemetry-flush`, so readers with their own connection, such as the
    experiment routes, see recent windows) and closed at stop."""

    name = "telemetry-ingest"

    def __init__(self, telemetry: TelemetryStore, flush_s: float = 5.0) -> None:
        self.telemetry = telemetry
        self.flush_s = flush_s
        self._runner = PeriodicRunner(logger)
        self._runner.add("telemetry-flush", telemetry.flush, flush_s)

    def ingest(self, device_id: str, payload: bytes) -> None:
        self.telemetry.ingest(payload)

    def start(self) -> None:
        self._runner.start()

    def stop(self) -> None:
        self._runner.stop()
        self.telemetry.close()


@dataclass
class FleetParts:
    """Every collaborator `fleet serve` builds, once, and its components in start order."""

    keystore: KeyStore
    repository: Repository
    signer: DirectorSigner
    publisher: Publisher | None
    telemetry: TelemetryStore
    alerts: AlertManager
    monitor: DriftMonitor
    controller: RolloutController
    experiments: ExperimentDriver
    refresher: TimestampRefresher
    components: list[Component]

    @property
    def api(self) -> ApiCollaborators:
        """The API's share (handed to `create_app`)."""
        return ApiCollaborators(repository=self.repository, publisher=self.publisher, monitor=self.monitor)


def build_components(settings: FleetSettings, store: Store, with_broker: bool,
                     config: ServeConfig | None = None,
                     clock: Callable[[], float] | None = None) -> FleetParts:
    """Everything `fleet serve` runs beside the API, each built once (see the module docstring).

    Raises `FleetInputError` (bad broker URL) and `FleetMisuseError` (keys, alert database).
    """
    cfg = config or ServeConfig()
    keystore, repo = ensure_trust(settings, cfg)
    signer = DirectorSigner(keystore, settings.data_dir / "director")
    publisher: Publisher | None = None
    telemetry = TelemetryStore(settings.telemetry_db_path, IngestConfig(window_s=cfg.telemetry_window_s))
    ingest = TelemetryComponent(telemetry)
    monitor = build_drift_monitor(settings, store, telemetry, clock, repository=repo)  # alerts, gauges
    metrics = TelemetryMetrics(telemetry, drift=monitor.drift_score)
    components: list[Component] = []
    if with_broker:
        password = settings.broker_password.get_secret_value() if settings.broker_password else None
        publisher = Publisher(broker_config(settings.broker_url, f"fleet-{settings.port}", password),
                              settings.topic_prefix, settings.repo_dir)
        components.append(PublisherComponent(publisher))
    components += [ingest, monitor]
    delta_bases = settings.delta_bases if cfg.delta_bases is None else cfg.delta_bases
    controller = RolloutController(store, repo, signer, publisher, clock=clock or time.time,
                                   config=ControllerConfig(tick_s=cfg.controller_tick_s), metrics=metrics,
                                   deltas=DeltaCatalog(repo, DeltaPolicy(bases=delta_bases)))
    if publisher is not None:
        publisher.on_reported(store.devices.on_reported)
        publisher.on_reported(controller.on_reported)
        # Events and telemetry from revoked devices (in flight, or before the broker reload) are
        # dropped and counted; reports are refused by `store.devices.on_reported` itself.
        # Agents send events at least once: a redelivery (same device and seq) is dropped first.
        publisher.on_event(EventDeduper(RevokedFilter(store, controller.on_event, "event")))
        publisher.on_telemetry(RevokedFilter(store, monitor.ingest, "telemetry"))  # timed ingest
    experiments = ExperimentDriver(store, repo, signer, publisher, tick_s=cfg.controller_tick_s * 2)
    refresher = TimestampRefresher(repo, cfg.timestamp_refresh_s, publisher)
    components += [controller, experiments, refresher]
    return FleetParts(keystore, repo, signer, publisher, telemetry, monitor.alerts, monitor, controller,
                      experiments, refresher, components)
