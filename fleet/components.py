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
   (`store.devices.on_reported`) and to the controller;
2. the telemetry ingest's store (flushed periodically, closed at stop) whose merged windows
   feed the rollout gates (`TelemetryMetrics`);
   then the drift monitor (`fleet/telemetry/monitor.py`), which times ingest, evaluates
   closed windows for drift (alerts, retraining triggers, Prometheus gauges) and gives the
   gates their drift score; then (ingest role) the acked streams, `TelemetryStream` and
   `EventStream`: telemetry and lifecycle events each on an MQTT connection of its own, each
   message acknowledged after the transaction that stored it (`fleet/delivery/acked_stream.py`),
   so the publisher's connection never waits on them, and events are stored in the database
   once (`fleet/delivery/event_log.py`) and wake the in-process controller;
3. the `LeaderElector` (`fleet/cluster/leader.py`), then the `RolloutController`, then the A/B
   `ExperimentDriver`: they, the drift evaluation and the timestamp refresher act only while
   this process holds the controller lease;
4. the `TrainingWorker` (`fleet/training/worker.py`, only with training policies in the
   settings), which turns retraining triggers into training jobs and runs them;
5. the `TimestampRefresher`, which re-signs `timestamp.json` well before it expires (a
   repository nobody touches would otherwise freeze every device after a day) and
   publishes it retained.

Opt-in data collection (issue 13, `fleet/collection/`): the `dataset-ingest` component (ingest
and controller roles; subscribes `.../devices/+/dataset` with the ingest role, owns the
`DatasetStore`) and, behind the lease, the `collection-driver`, which signs collection
policies into devices' director documents.

`roles` (`fleet/cluster/roles.py`) picks the subset a process runs: `api` builds none of the
components, `publisher` the publisher answering requests on `$share/<publish group>/...`,
`ingest` the telemetry store fed from `$share/<ingest group>-telemetry/...` with events (from
`$share/<ingest group>-events/...`) stored once in the database (`fleet/delivery/event_log.py`),
`controller` items 3-5 behind the lease. One process with every role (the default) subscribes
without share groups, as it always did (it then also gets the retained reported states at
start, which a shared subscription does not).

The periodic work (timestamp refresh, telemetry flush, drift evaluation) runs as jobs of
`fleet.periodic.PeriodicRunner`.

`ensure_trust(settings)` creates the keys, the TUF repository and the device CA (client
certificates for devices, `fleet/trust/device_ca.py`) under the data directory on first start
(root: 2 of 3 keys; move them offline afterwards, see docs/trust.md). The `CrlRefresher`
(`fleet/devices/certificates.py`) keeps the device CRL the broker reads from expiring.

Errors: `broker_config` and `ServeConfig` raise `FleetInputError` for a bad URL or period;
`ensure_trust` and `build_components` raise `FleetMisuseError` when keys are unreadable or the
alert database cannot be opened.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.contract.protocol import Event
from agent.logs import log_event
from agent.transport import Message
from agent.transport.mqtt_config import MqttConfig
from fleet.api.deps import ApiCollaborators
from fleet.cluster.leader import LeaderElector
from fleet.cluster.roles import ALL_ROLES, Role
from fleet.collection.driver import CollectionDriver, drift_episode_open
from fleet.collection.ingest import DatasetIngest
from fleet.collection.records import CollectionStore
from fleet.delivery.acked_stream import AckedStream, StreamSettings, retire_legacy_subscription
from fleet.delivery.broker_url import broker_config  # re-exported: `fleet.components.broker_config`
from fleet.delivery.event_log import EventBatch, EventLog
from fleet.delivery.event_stream import EVENT_SETTINGS, EventStream
from fleet.delivery.publisher import Publisher, PublisherSettings
from fleet.delivery.report_verify import ReportVerifier
from fleet.delivery.timestamp_refresher import TimestampRefresher
from fleet.devices.certificates import CrlRefresher
from fleet.devices.revocation import RevokedFilter
from fleet.errors import FleetError, FleetInputError
from fleet.periodic import PeriodicRunner
from fleet.registry.datasets import DatasetStore
from fleet.registry.delta_builds import DeltaBuilds
from fleet.registry.deltas import DeltaCatalog, DeltaPolicy
from fleet.rollouts.controller import RolloutController
from fleet.rollouts.controller_ports import ControllerConfig
from fleet.rollouts.experiments import ExperimentDriver
from fleet.rollouts.gates import TelemetryMetrics
from fleet.service import Component
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.acked_stream import TelemetryStream
from fleet.telemetry.alerts import AlertManager
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from fleet.telemetry.monitor import DriftMonitor, build_drift_monitor
from fleet.training.worker import TrainingWorker
from fleet.trust.device_ca import DeviceCA
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


def ensure_trust(settings: FleetSettings, config: ServeConfig | None = None) -> tuple[KeyStore, Repository]:
    """Open the key store and TUF repository under the data directory, creating them if absent.

    Raises `FleetMisuseError` (keys unreadable or incomplete)."""
    cfg = config or ServeConfig()
    keystore = KeyStore(settings.keys_dir)
    repo = Repository(settings.repo_dir, keystore)
    if not repo.initialized:
        repo.init(root_threshold=cfg.root_threshold, root_keys=cfg.root_keys)
        log_event(logger, "fleet.trust_initialised", repo=str(settings.repo_dir))
    if not DeviceCA.exists(settings.device_ca_dir):  # also for a data directory from before certificates
        DeviceCA.create(settings.device_ca_dir)
        log_event(logger, "fleet.device_ca_created", ca=str(settings.device_ca_dir / "ca.crt"))
    return keystore, repo


class PublisherComponent:
    """`Publisher` as a service component (it already has start/stop); `announce`: publish the
    retained root and timestamp at start (the processes answering requests do)."""

    name = "publisher"

    def __init__(self, publisher: Publisher, announce: bool = True) -> None:
        self.publisher = publisher
        self.announce = announce

    def start(self) -> None:
        self.publisher.start()
        for name in ("root.json", "timestamp.json") if self.announce else ():
            try:
                self.publisher.publish_metadata(name)
            except FleetError as exc:
                log_event(logger, "fleet.metadata_publish_failed", logging.WARNING, name=name, error=str(exc))

    def stop(self) -> None:
        self.publisher.stop()


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
    """Every collaborator `fleet serve` builds, once, and its components in start order
    (the controller's share is None in a process without the controller role)."""

    keystore: KeyStore
    repository: Repository
    signer: DirectorSigner
    publisher: Publisher | None
    telemetry: TelemetryStore
    alerts: AlertManager
    monitor: DriftMonitor
    controller: RolloutController | None
    experiments: ExperimentDriver | None
    refresher: TimestampRefresher | None
    components: list[Component]
    elector: LeaderElector | None = None
    events: EventLog | None = None
    datasets: DatasetStore | None = None  # collected dataset versions (closed by the dataset ingest)
    streams: tuple[AckedStream, ...] = ()  # the ingest role's acked streams (their counters: /metrics)

    @property
    def api(self) -> ApiCollaborators:
        """The API's share (handed to `create_app`)."""
        return ApiCollaborators(repository=self.repository, publisher=self.publisher, monitor=self.monitor,
                                streams=self.streams)


def _publisher(settings: FleetSettings, roles: frozenset[Role]) -> Publisher:
    """The MQTT side of a process: answers requests (publisher role), subscribes device messages
    (ingest role), publishes director documents (controller role). Share groups when split."""
    split = roles != ALL_ROLES
    password = settings.broker_password.get_secret_value() if settings.broker_password else None
    client_id = f"fleet-{settings.port}" if not split else _member_client_id(roles, settings.port)
    cluster = settings.cluster
    options = PublisherSettings(serve_requests=Role.PUBLISHER in roles,
                                share_group=cluster.publish_share_group if split else None,
                                ingest_share_group=cluster.ingest_share_group if split else None)
    return Publisher(broker_config(settings.broker_url, client_id, password), settings.topic_prefix,
                     settings.repo_dir, options)


def _ingest_group(settings: FleetSettings, roles: frozenset[Role]) -> str | None:
    return settings.cluster.ingest_share_group if roles != ALL_ROLES else None


def _stream_config(settings: FleetSettings, roles: frozenset[Role], kind: str) -> MqttConfig:
    """An acked stream's connection: client id `<fleet client id>-<kind>` (stable per slot: a
    restart gets what it held unacknowledged)."""
    password = settings.broker_password.get_secret_value() if settings.broker_password else None
    client_id = f"fleet-{settings.port}-{kind}" if roles == ALL_ROLES else _member_client_id(
        roles, settings.port, f"-{kind}")
    return broker_config(settings.broker_url, client_id, password)


def _streams(settings: FleetSettings, roles: frozenset[Role], publisher: Publisher,
             telemetry: tuple[Callable[[str, bytes], None], Callable[[], object]],
             events: tuple[Callable[[str, Event], None], Callable[[], object]],
             check: Callable[[Message], bool]) -> list[AckedStream]:
    """The ingest role's acked streams (share groups `<ingest group>-<kind>`), each given `(ingest,
    flush)`. Share-group members end their session on a clean stop, once drained; a lone `all`
    process keeps it, so what devices send while it restarts waits for it (acked_stream.py)."""
    group = _ingest_group(settings, roles)
    prefix, split = settings.topic_prefix, group is not None
    for kind in ("telemetry", "events"):  # an older release's session took them on the publisher's
        retire_legacy_subscription(publisher.transport, prefix, group, kind)
    return [
        TelemetryStream(_stream_config(settings, roles, "telemetry"), prefix,
                        f"{group}-telemetry" if group else None, *telemetry,
                        StreamSettings(end_session=split), check=check),
        EventStream(_stream_config(settings, roles, "events"), prefix, f"{group}-events" if group else None,
                    *events, publisher.malformed, replace(EVENT_SETTINGS, end_session=split), check=check),
    ]


def _member_client_id(roles: frozenset[Role], port: int, suffix: str = "") -> str:
    """`fleet-<roles>-<host>-<port>`: stable across restarts of one process slot, unique per slot.

    Why not the pid: the broker keeps a persistent session per client id (1 h expiry), and
    Mosquitto 2.0 keeps handing a share group's messages round-robin to a member whose session
    is offline, queuing them there (measured: after a SIGKILL, every other message went to the
    dead member's session). A replacement started on the same host and port resumes that
    session and gets the backlog; a pid-named one would leave it stranded until expiry."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()).strip(".-") or "host"
    head = f"fleet-{'-'.join(sorted(r.value for r in roles))}"
    tail = f"-{port}{suffix}"
    return f"{head}-{host[:max(1, 64 - len(head) - len(tail) - 1)]}{tail}"


def build_components(settings: FleetSettings, store: Store, with_broker: bool,
                     config: ServeConfig | None = None,
                     clock: Callable[[], float] | None = None,
                     roles: frozenset[Role] = ALL_ROLES) -> FleetParts:
    """Everything `fleet serve` runs beside the API for `roles`, each built once (see the module
    docstring). Raises `FleetInputError` (bad broker URL) and `FleetMisuseError` (keys, alert database).
    """
    cfg = config or ServeConfig()
    now = clock or time.time
    keystore, repo = ensure_trust(settings, cfg)
    signer = DirectorSigner(keystore, settings.data_dir / "director", database=settings.director_database)
    telemetry = TelemetryStore(settings.telemetry_database, IngestConfig(window_s=cfg.telemetry_window_s))
    monitor = build_drift_monitor(settings, store, telemetry, clock, repository=repo)  # alerts, gauges
    metrics = TelemetryMetrics(telemetry, drift=monitor.drift_score)
    needs_mqtt = bool(roles & {Role.PUBLISHER, Role.INGEST, Role.CONTROLLER})
    publisher = _publisher(settings, roles) if with_broker and needs_mqtt else None
    events = EventLog(store, now)
    components: list[Component] = []
    if publisher is not None:
        components.append(PublisherComponent(publisher, announce=Role.PUBLISHER in roles))
    components.append(TelemetryComponent(telemetry))  # flushes what this process ingests; closes it
    controller = experiments = refresher = elector = None
    streams: list[AckedStream] = []
    gate = None  # the check of signed device reports (issue 14): every kind, dataset chunks included
    if publisher is not None and Role.INGEST in roles:
        gate = ReportVerifier(store.report_keys, settings.topic_prefix, settings.report_signatures,
                              on_offline=store.devices.mark_offline)
    datasets = collections = None  # opt-in data collection (issue 13): ingest and controller roles
    if roles & {Role.INGEST, Role.CONTROLLER}:
        datasets = DatasetStore(settings.telemetry_database, now)
        collections = CollectionStore(datasets.database, now)
        takes = publisher if publisher is not None and Role.INGEST in roles else None  # subscribes chunks
        components.append(DatasetIngest(datasets, collections, now, takes.transport if takes else None,
                                        takes.topics if takes else None,
                                        settings.cluster.ingest_share_group if roles != ALL_ROLES else None,
                                        owns_store=True,  # started before, stopped after, the driver
                                        gate=gate if takes else None))  # chunks are signed reports too
    if Role.CONTROLLER in roles:
        delta_bases = settings.delta_bases if cfg.delta_bases is None else cfg.delta_bases
        lease_db = Store(settings.database, clock=now, busy_timeout_ms=settings.limits.sqlite_busy_timeout_ms)
        deltas = DeltaBuilds(DeltaCatalog(repo, DeltaPolicy(bases=delta_bases)))  # built off the tick
        elector = LeaderElector(lease_db, ttl_s=settings.cluster.leader_ttl_s, clock=now, owns_store=True,
                                guarded=store)
        controller = RolloutController(store, repo, signer, publisher, clock=now,
                                       config=ControllerConfig(tick_s=cfg.controller_tick_s), metrics=metrics,
                                       leadership=elector, event_log=events,
                                       deltas=deltas)
        elector.on_acquired = controller.wake
        monitor.active = elector.is_leader
        experiments = ExperimentDriver(store, repo, signer, publisher, tick_s=cfg.controller_tick_s * 2)
        experiments.active = elector.is_leader
        refresher = TimestampRefresher(repo, cfg.timestamp_refresh_s, publisher, active=elector.is_leader)
        components += [deltas, elector, monitor, controller, experiments, refresher,
                       CrlRefresher(store, settings)]
        assert collections is not None
        components.append(CollectionDriver(collections, store, repo, signer, publisher,  # issue 13
                                           lambda m, v: drift_episode_open(monitor.alerts, m, v), now,
                                           tick_s=cfg.controller_tick_s * 2, active=elector.is_leader))
        if settings.training.policies:  # retraining (fleet/training, docs/training.md): only when configured
            training = TrainingWorker(store, repo, store.training, settings.training, settings.data_dir,
                                      datasets=datasets, collections=collections, alerts=monitor.alerts,
                                      clock=now)
            training.active = elector.is_leader
            components.append(training)
    if publisher is not None and gate is not None:
        # Only reports signed by the device's key pass (issue 14; `report_signatures: optional` also
        # lets unsigned ones of keyless devices in, marked unsigned so rollouts ignore them).
        publisher.inbound_check = gate
        publisher.on_reported(lambda device, state: store.devices.on_reported(device, state,
                                                                              gate.last_signed))
        if controller is not None:
            publisher.on_reported(controller.on_reported)
        # Events and telemetry from revoked devices (in flight, or before the broker reload) are
        # dropped and counted; reports are refused by `store.devices.on_reported` itself.
        # Telemetry and events each on a connection of their own, acknowledged once stored
        # (fleet/delivery/acked_stream.py); agents send events at least once: each (device, seq)
        # is stored once, whichever worker got it. Both are signed: the same gate.
        batch = EventBatch(events, controller.wake if controller is not None else None)
        streams = _streams(settings, roles, publisher,
                           (RevokedFilter(store, monitor.ingest, "telemetry"), telemetry.flush),
                           (RevokedFilter(store, batch.add, "event"), batch.flush),
                           lambda msg: gate(msg, redelivery=True))
        components += streams  # after the telemetry store: stopped (final flush, acks) before it
    return FleetParts(keystore, repo, signer, publisher, telemetry, monitor.alerts, monitor, controller,
                      experiments, refresher, components, elector, events, datasets, tuple(streams))
