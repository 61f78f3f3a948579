"""`AgentDaemon`: the device agent process (`edgefleet agent run --config FILE`).

It wires the pieces together and owns no policy of its own:
- offline first: the state record is loaded and the active bundle served from disk before any
  network is touched; the local API (HTTP on loopback and/or a Unix socket) is up at once;
- MQTT in the background (`MqttTransport` reconnects by itself) with a retained Last Will
  that marks the device offline; subscriptions to its own and its cohorts' desired topics;
- every director document is verified (`DirectorIntake`, through the `DirectorGate`) before
  the `Lifecycle` sees it; a refused one is reported as an event and changes nothing;
- the `Lifecycle` (main thread) downloads over the `MqttFetcher` through a fresh TUF
  `Updater` per cycle, verifies, stages, activates, runs golden vectors and probation, and
  commits or rolls back by itself;
- reported state (retained) after every saved state change and on every (re)connect; events
  for what the lifecycle reports; telemetry reports every interval through the on-disk queue;
- `sd_notify` READY=1 once serving (or idle with nothing to serve), WATCHDOG=1 while the main
  loop makes progress; SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import platform
import random
import resource
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig
from agent.contract.protocol import ReportedState, Topics
from agent.daemon.broker_link import BrokerLink
from agent.daemon.collection import CollectionRunner
from agent.daemon.director_gate import DirectorGate
from agent.daemon.director_intake import DirectorIntake
from agent.daemon.events import EventOutbox, lifecycle_event, shadow_measurements
from agent.daemon.local_api import LocalApi, start_local_api
from agent.daemon.offline_import import ImportResult, OfflineImporter, lock_state_dir
from agent.daemon.process import Notifier, ObservedStore, agent_version
from agent.daemon.report_signer import ReportSigner
from agent.daemon.served_model import ServedModel
from agent.daemon.serving import ModelCatalog, TelemetryTap
from agent.daemon.settings import fetcher_config, lifecycle_config
from agent.daemon.uplink import Uplink
from agent.errors import EdgefleetError, MisuseError, TransportError
from agent.lifecycle import Lifecycle, sealing_extractor
from agent.lifecycle.machine import State
from agent.lifecycle.state_store import StateRecord
from agent.logs import log_event
from agent.serving.model_holder import ModelHolder
from agent.telemetry.feedback import FeedbackConfig, PredictionLog
from agent.telemetry.queue import QueueConfig, ReportQueue
from agent.transport.mqtt_client import MqttTransport
from agent.trust import TrustClient

if TYPE_CHECKING:
    from agent.transport.mqtt_fetcher import MqttFetcher

log = logging.getLogger("edgefleet.agent")

#: States where `active` is the committed, verified bundle: safe to serve before resuming.
_PRELOAD_STATES = frozenset({State.IDLE, State.DOWNLOADING, State.VERIFYING, State.STAGED})
MAX_PENDING_EVENTS = 1000  # events kept on disk while offline
EVENT_ACK_WAIT_S = 2.0  # on shutdown, how long to wait for the PUBACKs of events just sent
#: Optional protocol features this agent implements (reported, so the fleet may use them).
AGENT_FEATURES = ("delta",)


class AgentDaemon:
    """One device agent. `run()` blocks until `stop()` (or SIGTERM/SIGINT in the main thread)."""

    def __init__(
        self, config: AgentConfig, transport: MqttTransport | None = None, catalog: ModelCatalog | None = None
    ) -> None:
        # `transport`/`catalog` let the swarm simulator run many agents on one selector loop
        # and share loaded model sessions; a real device uses the defaults.
        self.config = config
        c = config
        self.state_dir = c.state_dir
        self.topics = Topics(c.topic_prefix, c.device_id)
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self._notifier = Notifier()
        self._heartbeat = time.monotonic()
        self._next_report: float | None = None  # when `tick` closes the next telemetry interval
        self._runtimes = tuple(
            name
            for mod, name in (("onnxruntime", "onnxruntime"), ("ai_edge_litert", "litert"))
            if importlib.util.find_spec(mod) is not None
        )
        try:
            self._bootstrap = c.bootstrap_root.read_bytes()
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MisuseError(f"cannot read the bootstrap root {c.bootstrap_root}: {exc}") from exc
        self.signer = ReportSigner.load(self.state_dir, c.device_id)  # None: no key yet, reports unsigned

        self.transport = transport if transport is not None else MqttTransport(c.mqtt)
        self.link = BrokerLink(self.state_dir, f"{c.mqtt.host}:{c.mqtt.port}")  # logs + `agent status`
        self.trust = TrustClient(
            self.state_dir / "tuf" / "metadata",
            self.state_dir / "tuf" / "targets",
            self._make_fetcher,  # built at the first update cycle, see there
            "mqtt://repo/metadata/",
            "mqtt://repo/targets/",
            bootstrap_root=self._bootstrap,
        )
        self.catalog = catalog if catalog is not None else ModelCatalog(c.model_threads)
        self.holder = ModelHolder()
        self.lifecycle = Lifecycle(
            lifecycle_config(c),
            self.holder,
            self.trust,
            emit=self._on_lifecycle_event,
            load=self.catalog.load, extract=sealing_extractor(self.trust, c.device_id, self.state_dir),
        )
        self.lifecycle.machine.store = ObservedStore(self.lifecycle.store, self._after_save)  # type: ignore[assignment]
        self.gate = DirectorGate(self.state_dir / "director.json", c.device_id, c.cohorts,
                                 self.trust.director_trust)
        self.outbox = EventOutbox(self.state_dir / "events.sqlite", MAX_PENDING_EVENTS)
        self.queue = ReportQueue(
            self.state_dir / "telemetry.sqlite",
            QueueConfig(max_reports=c.telemetry_queue_reports, max_bytes=c.telemetry_queue_bytes),
        )
        self.uplink = Uplink(self.transport, self.topics, c.device_id, self.signer, self.outbox, self.queue)
        self.tap = TelemetryTap(
            self.queue, self.catalog, c.device_id, c.cohorts[0] if c.cohorts else "",
            PredictionLog(FeedbackConfig(capacity=c.api.feedback_capacity, horizon_s=c.api.feedback_horizon_s,
                                         max_batch=c.api.max_batch)),
        )
        self.served = ServedModel(self.holder, self.catalog, self.tap)
        self.collection = CollectionRunner(self.state_dir, c.device_id, c.cohorts, self.trust.director_trust,
                                           self.transport, self.topics, sink=self.tap, signer=self.signer)
        self.director = DirectorIntake(self.gate, self.lifecycle, self.trust, self.collection,
                                       self.uplink.event)
        self.api = LocalApi()
        self.offline = OfflineImporter(self.state_dir, self._bootstrap, self.gate, self.lifecycle,
                                       self.uplink.event, c.offline_drop_dir)
        self._lock_fd: int | None = None

    def _make_fetcher(self) -> MqttFetcher:
        """The MQTT fetcher, built when the first update cycle needs it (`TrustClient` calls this).

        Deferred because importing it loads python-tuf's client, securesystemslib's signer and
        cryptography (~12 MB RSS): an idle agent serving its committed bundle needs none of them.
        """
        from agent.transport.mqtt_fetcher import MqttFetcher  # lazy: tuf+cryptography, ~12 MB

        return MqttFetcher(self.transport, self.topics, self.state_dir / "spool", fetcher_config(self.config))

    # --- serving ------------------------------------------------------------------------
    def _preload(self) -> None:
        """Serve the committed bundle from disk before anything else (offline first)."""
        rec = self.lifecycle.record
        if rec.active is None or State(rec.state) not in _PRELOAD_STATES:
            return
        ctx = self.lifecycle.ctx
        try:
            slot = ctx.slots.open(rec.active)
            ctx.slots.verify_model(slot)
            model = self.catalog.load(slot.model_path, slot.manifest, self.config.model_threads)
        except EdgefleetError as exc:  # the lifecycle's idle handler deals with it (rollback)
            log_event(log, "agent.preload_failed", logging.WARNING, bundle=rec.active, error=str(exc))
            return
        self.holder.swap(model, rec.active, keep_previous=False)
        log_event(log, "agent.serving_from_disk", bundle=rec.active, state=rec.state)

    @property
    def http_port(self) -> int | None:
        return self.api.http_port

    # --- MQTT ---------------------------------------------------------------------------
    def _start_mqtt(self) -> None:
        self.uplink.set_will(ReportedState(device_id=self.config.device_id, online=False,
                                           timestamp=time.time(), labels=dict(self.config.labels)))
        self.transport.add_on_connect(self._on_connect)
        self.transport.add_on_link_down(self.link.down)
        self.link.connecting()
        self.transport.subscribe(
            self.topics.desired(), self.director.handler(f"device:{self.config.device_id}")
        )
        for cohort in self.config.cohorts:
            self.transport.subscribe(
                self.topics.cohort_desired(cohort), self.director.handler(f"cohort:{cohort}")
            )
        with contextlib.suppress(TransportError):
            self.transport.connect(timeout=0.01)  # starts the reconnecting supervisor; never blocks

    def _on_connect(self, session_present: bool) -> None:
        self.link.connected(session_present)
        self.publish_reported()
        self.uplink.flush_events()
        self.lifecycle.ctx.wake.set()

    def _after_save(self, record: StateRecord) -> None:
        self.publish_reported(record)

    def reported_state(self, record: StateRecord | None = None, online: bool = True) -> ReportedState:
        rec = record or self.lifecycle.record
        return ReportedState(
            device_id=self.config.device_id,
            agent_version=agent_version(),
            state=rec.state,
            active_bundle=rec.active,
            previous_bundle=rec.previous,
            director_sequence=rec.director_sequence,
            runtimes=list(self._runtimes),
            architecture=platform.machine(),
            memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            labels=dict(self.config.labels),
            online=online,
            timestamp=time.time(),
            features=list(AGENT_FEATURES),
            install_origin=self.offline.origin_of(rec.active),

            hold=rec.hold,
        )

    def publish_reported(self, record: StateRecord | None = None, online: bool = True) -> bool:
        """Publish the retained reported state; False when offline (sent again on connect)."""
        return self.uplink.publish_reported(lambda: self.reported_state(record, online))

    # --- events, telemetry and ticking ----------------------------------------------------
    def _on_lifecycle_event(self, name: str, fields: dict[str, Any]) -> None:
        previous = self.lifecycle.record.previous if name == "activated" else None
        self.uplink.event(**lifecycle_event(name, fields, previous))

    def _shadow_event(self) -> None:
        rep = self.holder.shadow_report()
        if rep.bundle_id is None or rep.offered == 0:
            return
        self.uplink.event("shadow_report", bundle_id=rep.bundle_id, previous_bundle_id=self.holder.bundle_id,
                          measurements=shadow_measurements(rep))

    def _ticker(self) -> None:
        """The ticker thread: `tick()` every `report_interval_s`, from a random phase."""
        if self.stop_event.wait(self.config.report_interval_s * random.random()):
            return
        while not self.stop_event.wait(self.config.report_interval_s):
            self.tick()

    def _start_ticker(self) -> threading.Thread | None:
        """Start the ticker thread (a host running many agents may drive `tick` itself)."""
        ticker = threading.Thread(target=self._ticker, name="agent-ticker", daemon=True)
        ticker.start()
        return ticker

    def tick(self) -> None:
        """One ticker period: watchdog, closing a telemetry interval, sending what is queued.

        Never raises (the ticker must survive anything one period throws).
        """
        now = time.monotonic()
        if self._next_report is None:
            # A random phase: agents started together (a site powered up, a fleet restarted)
            # must not all report, and hit the fleet and the broker, in the same instant forever.
            self._next_report = now + self.config.telemetry_interval_s * random.uniform(0.5, 1.0)
        if now - self._heartbeat < self.config.watchdog_stall_s:
            self._notifier.notify("WATCHDOG=1")
        try:
            if now >= self._next_report:
                self._next_report += self.config.telemetry_interval_s
                self.tap.flush(self.holder.bundle_id)
                self._shadow_event()
            self.uplink.send_telemetry()
            self.uplink.flush_events()
            self.collection.tick()
        except Exception:
            log.exception("agent ticker failed")

    def _beat(self) -> None:
        self._heartbeat = time.monotonic()
        self.offline.poll_drop_dir()
        if self.director.has_deferred and self.transport.connected:
            self.director.retry_deferred()

    # --- run ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask `run()` to return (thread- and signal-safe)."""
        self.stop_event.set()
        self.lifecycle.ctx.wake.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _s, _f: self.stop())

    def run(self) -> int:
        """Serve, install, report until stopped. Returns the process exit code (0)."""
        self._install_signals()
        self._lock_fd = lock_state_dir(self.state_dir)  # `agent import` must not write beside us
        self._preload()
        self.api = start_local_api(self.config.api, self.served, self.tap)
        log_event(log, "agent.api_up", serving=self.holder.bundle_id, state=self.lifecycle.record.state)
        self._start_mqtt()
        ticker = self._start_ticker()
        try:
            self._note_crash()
            self.lifecycle.start()
            self.publish_reported()
            self.ready.set()
            self._notifier.notify("READY=1")
            log_event(log, "agent.ready", serving=self.holder.bundle_id, state=self.lifecycle.state.value)
            # the heartbeat (and deferred documents' retry) runs every poll; new work wakes it
            poll_s = min(max(0.5, self.config.report_interval_s), 5.0)
            self.lifecycle.run_forever(self.stop_event, poll_s=poll_s, on_tick=self._beat)
        finally:
            self._shutdown(ticker)
        return 0

    def _note_crash(self) -> None:
        """A record outside `idle` at start means the last run died mid-update: say so."""
        rec = self.lifecycle.record
        if rec.state == State.IDLE.value or rec.hold:  # a held update was resting, not working
            return
        reason = f"agent restarted during {rec.state} (crash, kill or power loss)"
        if not rec.last_error:
            rec.last_error = reason  # the resumed handlers report it (e.g. as the rollback reason)
        log_event(log, "agent.crash_recovered", logging.WARNING, state=rec.state, bundle=rec.candidate)
        self.uplink.event("crash_recovered", bundle_id=rec.candidate, reason=reason)

    def _shutdown(self, ticker: threading.Thread | None) -> None:
        self._notifier.notify("STOPPING=1")
        self.stop_event.set()
        if ticker is not None:
            ticker.join(timeout=5)
        self.api.stop()
        with contextlib.suppress(Exception):
            self.tap.flush(self.holder.bundle_id)
            self.uplink.send_telemetry()
        with contextlib.suppress(Exception):  # unacknowledged events are sent again at the next start
            self.uplink.flush_events()
            if self.transport.connected:
                self.outbox.wait_acknowledged(EVENT_ACK_WAIT_S)
        self.publish_reported(online=False)
        self.transport.close()
        self.link.stopped()
        self.holder.close()
        self.queue.close()
        self.outbox.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        log_event(log, "agent.stopped")

    def import_offline(self, path: Path) -> ImportResult:
        """`edgefleet agent import FILE`: apply an offline file with no network (agent not running).

        Events wait in the outbox for the next `agent run`. Raises what
        `OfflineImporter.import_file` raises, and `MisuseError` when the agent is running.
        """
        fd = lock_state_dir(self.state_dir)
        try:
            self.lifecycle.start()
            try:
                return self.offline.import_file(path)
            except EdgefleetError as exc:
                self.uplink.event("offline_refused", reason=f"{path.name}: {type(exc).__name__}: {exc}")
                raise
        finally:
            self.outbox.close()
            self.queue.close()
            self.transport.close()
            os.close(fd)
