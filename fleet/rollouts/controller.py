"""`RolloutController`: drives every active rollout from the store, one tick at a time.

Each tick (every `tick_s`, or sooner when a device reports) it applies the device events
queued since the last tick, then for each unfinished rollout: starts it (TUF target, cohort
from the label selector in a stable hash order); follows operator intent (`desired`
pause / resume / abort, queued promote / rollback / cancel); folds the devices' reports,
events and timeouts into their outcomes (a device *succeeds only* once it runs the new
bundle committed); evaluates the gates and pauses or aborts on a breach; sends the next
devices the strategy allows a new signed director document each (retained, so an offline
device gets it on reconnect); and advances the stage once all its devices have an outcome
and the bake time has passed. Abort sends every assigned device a NEW document naming the
bundle it ran before and waits for each (or `revert_timeout_s`); cancel stops at once.

Why this shape: the pure functions of `fleet.rollouts.machine` (and, per device,
`fleet.rollouts.device_verdicts`) decide; this module does the I/O, with two parts of it apart:
the documents go out through `fleet.rollouts.dispatch` (signer, broker, deltas) and device events
come in through `fleet.rollouts.event_intake` (memory queue or `EventLog`). Every state change goes
through the table and is written with what it implies (runtime phase, stage clock, consumed
command) in one transaction, before the work it leads to, so a restarted fleet resumes.

Several fleet processes (docs/scaling.md): only the leader ticks (`Leadership.is_leader`), and
every transaction of a tick first checks the leader's fencing token (`Leadership.fence`), so a
stale leader's writes roll back. Device events then come from the database (`EventLog`, written
by whichever ingest worker got them) and are marked handled in the transaction applying them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from agent.contract.director import TargetRef
from agent.contract.protocol import Event, ReportedState
from agent.logs import log_event
from fleet.cluster.lease import LeaseLost
from fleet.delivery.event_log import EventLog
from fleet.devices.selector import parse_selector
from fleet.errors import FleetError
from fleet.periodic import PeriodicRunner
from fleet.rollouts import machine
from fleet.rollouts.approval import decide_approval
from fleet.rollouts.controller_ports import (
    ControllerConfig,
    DeltaSource,
    DesiredPublisher,
    DirectorIssuer,
    Leadership,
    TargetSource,
    _Always,
)
from fleet.rollouts.device_verdicts import forward_update, revert_verdict
from fleet.rollouts.dispatch import DocumentDispatch
from fleet.rollouts.event_intake import DeviceEventIntake
from fleet.rollouts.gates import Breach, GateThresholds, MetricsSource, OutcomeCounts, evaluate
from fleet.rollouts.gates import rollout_evidence as gate_evidence
from fleet.rollouts.machine import Decision, Desired, QueuedCommand, RolloutEvent, RolloutSnapshot, Work
from fleet.rollouts.policies import admit_rows, success_breach
from fleet.rollouts.record_types import (
    FINAL_OUTCOMES,
    NO_REPORT,
    DeviceProgress,
    GateBreach,
    RolloutCommand,
    RolloutRuntime,
    RuntimePhase,
    bundle_index,
    outcome_counts,
)
from fleet.rollouts.records import RolloutRecords
from fleet.rollouts.store import Rollout
from fleet.rollouts.strategies import StrategyConfig, dispatch_quota, stage_target
from fleet.store import Store

logger = logging.getLogger("edgefleet.fleet.rollouts")


class RolloutController:
    """The fleet component that turns rollout records into director documents and verdicts."""

    name = "rollout-controller"

    def __init__(self, store: Store, repository: TargetSource, signer: DirectorIssuer,
                 publisher: DesiredPublisher | None, clock: Callable[[], float] = time.time,
                 config: ControllerConfig | None = None, metrics: MetricsSource | None = None,
                 leadership: Leadership | None = None, event_log: EventLog | None = None,
                 deltas: DeltaSource | None = None) -> None:
        self.store = store
        self.leadership: Leadership = leadership or _Always()
        self.records = RolloutRecords(store)
        self.repository = repository
        self.publisher = publisher
        self.clock = clock
        self.config = config or ControllerConfig()
        self.metrics = metrics
        self.dispatch = DocumentDispatch(store, self.records, repository, signer, publisher, self.config,
                                         deltas, self._tx)
        # event_log None: events arrive through `on_event` (one process)
        self.intake = DeviceEventIntake(self.records, self.leadership, event_log, self.config.clock_skew_s,
                                        self.config.max_events, self._tx)
        self._wake = threading.Event()
        self._tick_lock = threading.Lock()
        # Coalesced wake-ups: with a thousand devices reporting, a wake arrives before every tick
        # ends and back-to-back ticks would take the whole process. Events are queued, so a pause
        # loses nothing; it is at least `min_tick_gap_s` and at least as long as the tick itself
        # (the controller spends at most half its time ticking).
        self._runner = PeriodicRunner(logger)
        # `self.tick` looked up at each run (a test or a subclass may rebind it)
        self._runner.add(self.name, lambda: self.tick(), self.config.tick_s, run_at_start=True,
                         min_gap_s=self.config.min_tick_gap_s, gap_covers_run_time=True,
                         wake=self._wake, join_timeout_s=30)

    # -- component ----------------------------------------------------------------------------
    def start(self) -> None:
        self._runner.start()

    def stop(self) -> None:
        self._runner.stop()

    # -- publisher callbacks (any thread) ----------------------------------------------------------
    def on_reported(self, device_id: str, state: ReportedState) -> None:
        """Reported state is read from the store (register `store.devices.on_reported` first);
        this only wakes the controller so it reacts at once."""
        self._wake.set()

    def on_event(self, device_id: str, event: Event) -> None:
        self.intake.queue(device_id, event)
        self._wake.set()

    def wake(self) -> None:
        """Tick soon (an event was stored, the lease was acquired)."""
        self._wake.set()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """A store transaction that first checks the leader's fencing token (`LeaseLost`)."""
        with self.store.tx():
            self.leadership.fence()
            yield

    # -- one pass -------------------------------------------------------------------------------
    def tick(self) -> None:
        """Apply queued events, then drive every active rollout once (thread-safe)."""
        if not self.leadership.is_leader():
            return
        with self._tick_lock:
            try:
                self.intake.apply()
                for ro in self.records.active_rollouts():
                    try:
                        self._drive(ro)
                    except LeaseLost:
                        raise
                    except FleetError as exc:
                        log_event(logger, "rollout.tick_failed", logging.WARNING, rollout=ro.id,
                                  error=str(exc))
            except LeaseLost as exc:  # a newer leader acts now; this tick's last write rolled back
                log_event(logger, "rollout.not_leader", logging.WARNING, error=str(exc))

    def _snapshot(self, ro: Rollout, rt: RolloutRuntime | None,
                  queued: list[RolloutCommand]) -> RolloutSnapshot:
        return RolloutSnapshot(state=ro.state, desired=ro.desired, stage=ro.stage, started=rt is not None,
                               commands={c.command: QueuedCommand(c.id, c.actor, c.note) for c in queued},
                               can_publish=self.publisher is not None)

    def _apply(self, ro: Rollout, rt: RolloutRuntime | None, decision: Decision, now: float,
               **runtime: Any) -> Rollout:
        """Persist a decision in one transaction: the new state (through the table) first, then
        the runtime columns it implies and the command it consumes. Returns the fresh record."""
        state = machine.run_events(ro.state, decision.events)
        stage = ro.stage if decision.stage is None else decision.stage
        with self._tx():
            fresh = ro
            if (ro.state, ro.stage) != (state, stage):
                fresh = self.store.rollouts.set_state(ro.id, state, stage, self.config.actor, decision.note)
                log_event(logger, "rollout.state", rollout=ro.id, state=state.value, stage=stage,
                          note=decision.note)
            if rt is not None:
                runtime.update(rt.on_entry(state, decision.events))
                if stage != ro.stage:  # the next stage's clock starts
                    runtime.update(stage_started_at=now, stage_done_at=None)
                if runtime:
                    self.records.update_runtime(ro.id, **runtime)
            if decision.consumes is not None:
                self.records.command_done(decision.consumes.id)
        return fresh

    def _drive(self, ro: Rollout) -> None:
        now = self.clock()
        queued = self.records.pending_commands(ro.id)
        rt = self.records.runtime(ro.id)
        snapshot = self._snapshot(ro, rt, queued)
        decision = machine.decide_intent(snapshot)
        if decision.work is Work.BEGIN:
            rt = self._begin(ro, rt, now)
            if rt is None:
                return
            ro = self.store.rollouts.get(ro.id)
            snapshot = self._snapshot(ro, rt, queued)
            decision = machine.decide_intent(snapshot)
        if RolloutEvent.CANCEL_REQUESTED in decision.events:
            self._cancel(ro, rt, decision, now)
            return
        if rt is None:  # not started: aborted before it started, or waiting for a publisher
            if decision.events:
                self._apply(ro, rt, decision, now)
            return
        # Revoked devices get no more documents (pending ones leave the cohort, open ones are skipped).
        self.records.drop_revoked(ro.id, now, reverting=rt.phase is RuntimePhase.ROLLBACK)
        if decision.events:
            self._apply(ro, rt, decision, now)
        elif decision.work is Work.REVERT:
            self._drive_revert(ro, rt, now)
        elif decision.work is Work.FORWARD:
            self._drive_forward(ro, rt, snapshot, now)

    def _drive_forward(self, ro: Rollout, rt: RolloutRuntime, snapshot: RolloutSnapshot, now: float) -> None:
        """Observe, then operator intent, gates, assignments and the stage verdict, in that order."""
        cfg = StrategyConfig.parse(ro.strategy)
        rows = self._observe(rt, cfg, now)
        if ro.state is machine.RolloutState.PAUSED:  # an approval that arrived after its timeout
            ro, rt, _ = self._approval(ro, rt, snapshot, cfg, now)
            snapshot = self._snapshot(ro, rt, self.records.pending_commands(ro.id))
        decision = machine.decide_operator(snapshot, cfg)
        breach = rt.breach
        if decision.acknowledge_breach and breach is not None:
            breach = replace(breach, acked=True)
            ro = self._apply(ro, rt, decision, now, breach=breach)
        elif decision.events or decision.consumes is not None:
            ro = self._apply(ro, rt, decision, now)
        if decision.work is not Work.FORWARD:
            return
        snapshot = replace(snapshot, state=ro.state, stage=ro.stage)
        if cfg.include_late_devices and self.records.add_devices(
                ro.id, self.store.devices.ids_matching(parse_selector(ro.selector))):
            rows = self.records.progress(ro.id)
        counts = outcome_counts(rows)
        acked = breach is not None and breach.acked and breach.stage == ro.stage
        breaches = [] if acked else self._gates(ro, rt, counts, rows)
        if breaches:
            self._breach(ro, rt, cfg, breaches, now)
            return
        ro, rt, gated = self._approval(ro, rt, snapshot, cfg, now)
        if gated:
            return
        assigned = [r.assigned_at for r in rows if r.assigned_at is not None]
        quota = dispatch_quota(cfg, ro.stage, len(rows), len(assigned), now, assigned, counts.succeeded)
        if quota > 0:  # labels only when someone may start: budgets group by them, windows per group
            labels = self.records.labels_of([r.device_id for r in rows]) \
                if cfg.budget is not None or cfg.windows is not None else {}
            fresh = admit_rows(cfg.budget, rows, labels, quota)
            assigned += [now] * self.dispatch.assign(ro.id, rt, cfg, fresh, ro.stage, now, labels)
        stage_done = len(assigned) >= stage_target(cfg, ro.stage, len(rows)) and all(
            r.outcome in FINAL_OUTCOMES for r in self.records.progress(ro.id) if r.assigned_at is not None)
        if stage_done and not acked and promote_free(snapshot):
            short = success_breach(cfg.success_threshold(ro.stage), ro.stage,
                                   outcome_counts(self.records.progress(ro.id)))
            if short is not None:
                self._breach(ro, rt, cfg, [short], now)
                return
        verdict = machine.judge_stage(snapshot, cfg, stage_done, rt.stage_done_at, now, counts)
        if verdict.done_at != rt.stage_done_at:
            self.records.update_runtime(ro.id, stage_done_at=verdict.done_at)
        if verdict.decision.events:
            self._apply(ro, rt, verdict.decision, now)

    # -- site policies --------------------------------------------------------------------------
    def _approval(self, ro: Rollout, rt: RolloutRuntime, snapshot: RolloutSnapshot, cfg: StrategyConfig,
                  now: float) -> tuple[Rollout, RolloutRuntime, bool]:
        """Hold the stage for its approval, or record one (fresh records, and whether gated)."""
        step = decide_approval(snapshot, cfg, rt.approved_stage, rt.approval_requested_at, now)
        if step is None or not step.writes:
            return ro, rt, step is not None and step.gated
        log_event(logger, "rollout.approval", rollout=ro.id, stage=ro.stage, note=step.decision.note)
        with self.store.tx():
            if step.pauses and ro.desired is Desired.RUN:  # resumed with the ordinary `resume`
                self.store.rollouts.request(ro.id, "pause", f"{self.config.actor}:approval",
                                            step.decision.note[:1000])
            ro = self._apply(ro, rt, step.decision, now, **step.runtime(ro.stage, now))
        fresh = self.records.runtime(ro.id)
        assert fresh is not None
        return ro, fresh, step.gated

    # -- start, gates ------------------------------------------------------------------------------
    def _begin(self, ro: Rollout, rt: RolloutRuntime | None, now: float) -> RolloutRuntime | None:
        """Resolve the bundle and the cohort: STARTED (state and runtime in one transaction) or
        START_FAILED. A runtime without the state change is a start a restart cut short."""
        if rt is not None:
            self._apply(ro, rt, Decision((RolloutEvent.STARTED,), note="started before a restart"), now)
            return rt
        try:
            cfg = StrategyConfig.parse(ro.strategy)
            GateThresholds.parse(ro.thresholds)
            ref = self.dispatch.version_ref(ro.model_version_id)
            if cfg.shadow_model_version_id:
                self.dispatch.version_ref(cfg.shadow_model_version_id)
            devices = self.store.devices.ids_matching(parse_selector(ro.selector))
        except FleetError as exc:
            self._apply(ro, rt, Decision((RolloutEvent.START_FAILED,), note=f"cannot start: {exc}"), now)
            return None
        started = Decision((RolloutEvent.STARTED,), note=f"{len(devices)} devices, strategy {cfg.kind}")
        with self._tx():
            self._apply(ro, rt, started, now)
            self.records.add_devices(ro.id, devices)
            return self.records.init_runtime(ro.id, _bundle_id(ref), ref.path, now)

    def _gates(self, ro: Rollout, rt: RolloutRuntime, counts: OutcomeCounts,
               rows: list[DeviceProgress]) -> list[Breach]:
        candidate, baseline = gate_evidence(  # shadow agreement: durable in the runtime record
            self.metrics, bundle_index(self.repository), rt.target_bundle, rt.started_at,
            [r.from_bundle for r in rows], rt.shadow_agreement)
        return evaluate(GateThresholds.parse(ro.thresholds), counts, candidate, baseline)

    def _breach(self, ro: Rollout, rt: RolloutRuntime, cfg: StrategyConfig, breaches: list[Breach],
                now: float) -> None:
        """Record the breach and its evidence, then pause (recording a `pause` intent) or abort."""
        rid, note = ro.id, "; ".join(b.message for b in breaches)
        items = [b.to_dict() for b in breaches]
        event = machine.breach_event(cfg)
        log_event(logger, "rollout.gate_breach", logging.WARNING, rollout=rid, action=cfg.on_breach,
                  note=note)
        with self._tx():
            self.records.update_runtime(rid, breach=GateBreach(ro.stage, False, items))
            self.store.audit.record(f"{self.config.actor}:gates", "rollout.gate_breach", f"rollouts/{rid}",
                                    None, {"stage": ro.stage, "action": cfg.on_breach, "breaches": items})
            if event is RolloutEvent.GATE_BREACH_PAUSE and ro.desired is not Desired.PAUSE:
                self.store.rollouts.request(rid, "pause", f"{self.config.actor}:gates", note[:1000])
            self._apply(ro, rt, Decision((event,), note=f"gate breach: {note}"), now)

    def _observe(self, rt: RolloutRuntime, cfg: StrategyConfig, now: float) -> list[DeviceProgress]:
        """Fold reported states and timeouts into the forward outcomes; returns fresh rows."""
        rid = rt.rollout_id
        rows = self.records.progress(rid)
        open_rows = [r for r in rows if r.assigned_at is not None and r.outcome in (None, "timeout")]
        reports = self.records.reported_states([r.device_id for r in open_rows])
        changed = False
        with self._tx():  # one transaction for the stage's verdicts (and one fence check)
            for r in open_rows:
                update = forward_update(r, reports.get(r.device_id, NO_REPORT), rt.target_bundle, now, cfg,
                                        self.config.clock_skew_s)
                if update is not None:
                    self.records.update_device(rid, r.device_id, update.status, **update.fields)
                    changed = True
        return self.records.progress(rid) if changed else rows

    # -- rollback / cancel ------------------------------------------------------------------------
    def _drive_revert(self, ro: Rollout, rt: RolloutRuntime, now: float) -> None:
        """Send each assigned device back to its previous bundle; end once each has an outcome."""
        rid = ro.id
        cfg = StrategyConfig.parse(ro.strategy)
        rows = self.records.progress(rid)
        index = bundle_index(self.repository)
        reports = self.records.reported_states([r.device_id for r in rows if r.outcome == "reverting"])
        for r in rows:
            verdict = revert_verdict(r, reports.get(r.device_id, NO_REPORT), rt.target_bundle, index, now,
                                     cfg, self.config.clock_skew_s)
            if verdict is None:
                continue
            if verdict.send_to is not None:
                if self.publisher is None:
                    continue
                if not self.dispatch.send(rid, r.device_id, index[verdict.send_to], f"rollback of {rid}"):
                    return
            with self._tx():
                self.records.update_device(rid, r.device_id, verdict.update.status, **verdict.update.fields)
        end = machine.decide_revert_end((r.outcome for r in self.records.progress(rid)), rt.final_state)
        if end.events:
            self._apply(ro, rt, end, now)

    def _cancel(self, ro: Rollout, rt: RolloutRuntime | None, decision: Decision, now: float) -> None:
        """Stop at once: cancelled (runtime done, command consumed), open devices `skipped`."""
        with self._tx():
            self._apply(ro, rt, decision, now)
            for r in self.records.progress(ro.id):
                if r.outcome not in FINAL_OUTCOMES:
                    self.records.update_device(ro.id, r.device_id, "skipped", outcome="skipped",
                                               detail="rollout cancelled; device left as it is")


def promote_free(s: RolloutSnapshot) -> bool:
    """No `promote` is queued (an operator's promote moves on whatever the success threshold says)."""
    return machine.Command.PROMOTE not in s.commands


def _bundle_id(ref: TargetRef) -> str:
    return f"{ref.name}-{ref.version}"
