"""`RolloutController`: drives every active rollout from the store, one tick at a time.

Each tick (every `tick_s`, or sooner when a device reports) it applies the device events
queued since the last tick, then for each rollout that is not finished:

1. starts it (`pending`): resolves the version's TUF target, snapshots the cohort from the
   label selector (devices that enroll later and match join it), orders it by a stable hash;
2. follows operator intent: `desired` pause / resume / abort from the API, and the queued
   commands promote / rollback / cancel (`fleet.rollouts.records`);
3. observes devices: a device *succeeds only* when it reports `idle` with the new bundle
   active (the agent reaches that only after golden vectors and probation, i.e. committed)
   or sends `committed` for it; `rolled_back` / `update_failed` events fail it; a device with
   no outcome `device_timeout_s` after its document was published fails as `timeout` (and
   is upgraded if it commits later), so nothing stays pending forever;
4. evaluates the gates (`fleet.rollouts.gates`) and pauses or aborts on a breach;
5. assigns the next devices the strategy allows (`fleet.rollouts.strategies`): a new signed
   director document per device (`DirectorSigner.issue`), published retained, so an offline
   device picks it up when it reconnects;
6. advances the stage once every device of the stage has an outcome and the bake time has
   passed, and completes the rollout after the last stage.

Abort (operator, gate, or `rollback` command) sends every device that was assigned a NEW
director document naming the bundle it ran before, then waits until each reports it (or
`revert_timeout_s` passes). Cancel stops everything at once from any unfinished state and
leaves devices as they are. All progress lives in SQLite, so a restarted fleet resumes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol

from agent.contract.director import TargetRef
from agent.contract.protocol import Event, ReportedState
from agent.logs import log_event
from fleet.db.rows import Row
from fleet.devices.selector import parse_selector
from fleet.errors import FleetError, FleetInputError, FleetTransportError
from fleet.rollouts.gates import (
    Breach,
    GateThresholds,
    MetricsSource,
    OutcomeCounts,
    VersionMetrics,
    evaluate,
)
from fleet.rollouts.records import FINAL_OUTCOMES, RolloutRecords, bundle_index, outcome_counts
from fleet.rollouts.strategies import (
    StrategyConfig,
    dispatch_quota,
    stage_count,
    stage_ready_to_advance,
    stage_target,
)
from fleet.store import Store

logger = logging.getLogger("edgefleet.fleet.rollouts")
PROGRESS_STATUS = {"downloading": "downloading", "verifying": "downloading", "staged": "installed",
                   "activating": "installed", "probation": "probation", "committed": "probation"}


class DesiredPublisher(Protocol):
    """What the controller needs of `fleet.delivery.publisher.Publisher`."""

    def publish_desired(self, device_id: str | None = None, cohort: str | None = None, *,
                        document: bytes) -> str: ...


class TargetSource(Protocol):
    """What the controller needs of `fleet.trust.repository.Repository`."""

    def target_ref(self, target_path: str) -> TargetRef: ...

    def load(self, role: str) -> Any: ...


class DirectorIssuer(Protocol):
    def issue(self, target: TargetRef, device_id: str | None = None, cohort: str | None = None,
              shadow: TargetRef | None = None, ttl: timedelta = ..., rollout_id: str | None = None,
              reason: str = "") -> bytes: ...


@dataclass(frozen=True)
class ControllerConfig:
    """Tick period (and the least pause between ticks), the actor name in the audit log,
    tolerated device clock skew, document TTL."""

    tick_s: float = 0.5
    min_tick_gap_s: float = 0.1  # capped at tick_s; see `RolloutController._loop`
    actor: str = "controller"
    clock_skew_s: float = 5.0
    document_ttl: timedelta = timedelta(days=7)
    max_events: int = 100_000

    def __post_init__(self) -> None:
        if not 0.01 <= self.tick_s <= 3600:
            raise FleetInputError("controller tick_s must be within 0.01..3600 s")
        if not 0 <= self.min_tick_gap_s <= 3600:
            raise FleetInputError("controller min_tick_gap_s must be within 0..3600 s")


class RolloutController:
    """The fleet component that turns rollout records into director documents and verdicts."""

    name = "rollout-controller"

    def __init__(self, store: Store, repository: TargetSource, signer: DirectorIssuer,
                 publisher: DesiredPublisher | None, clock: Callable[[], float] = time.time,
                 config: ControllerConfig | None = None, metrics: MetricsSource | None = None) -> None:
        self.store = store
        self.records = RolloutRecords(store)
        self.repository = repository
        self.signer = signer
        self.publisher = publisher
        self.clock = clock
        self.config = config or ControllerConfig()
        self.metrics = metrics
        self._events: deque[tuple[str, Event]] = deque(maxlen=self.config.max_events)
        self._shadow: dict[str, tuple[float, float]] = {}  # rollout -> (sum agreement*n, n)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    # -- component ----------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rollout-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # one bad tick must not stop the controller
                logger.exception("rollout controller tick failed")
            # Coalesce wake-ups: with a thousand devices reporting, a wake arrives before every
            # tick ends and back-to-back ticks would take the whole process. Events are queued,
            # so a pause loses nothing; it is at least `min_tick_gap_s` and at least as long as
            # the tick itself (the controller spends at most half its time ticking).
            pause = max(min(self.config.min_tick_gap_s, self.config.tick_s), time.monotonic() - started)
            if self._stop.wait(pause):
                return
            self._wake.wait(max(0.0, self.config.tick_s - pause))
            self._wake.clear()

    # -- publisher callbacks (any thread) ----------------------------------------------------------
    def on_reported(self, device_id: str, state: ReportedState) -> None:
        """Reported state is read from the store (register `store.devices.on_reported` first);
        this only wakes the controller so it reacts at once."""
        self._wake.set()

    def on_event(self, device_id: str, event: Event) -> None:
        self._events.append((device_id, event))
        self._wake.set()

    # -- one pass -------------------------------------------------------------------------------
    def tick(self) -> None:
        """Apply queued events, then drive every active rollout once (thread-safe)."""
        with self._tick_lock:
            self._apply_events()
            for ro in self.records.active_rollouts():
                try:
                    self._drive(ro)
                except FleetError as exc:
                    log_event(logger, "rollout.tick_failed", logging.WARNING, rollout=ro["id"],
                              error=str(exc))

    def _set_state(self, ro: Row, state: str, stage: int, note: str = "") -> None:
        if ro["state"] == state and ro["stage"] == stage:
            return
        self.store.rollouts.set_state(ro["id"], state, stage, self.config.actor, note)
        log_event(logger, "rollout.state", rollout=ro["id"], state=state, stage=stage, note=note)

    def _drive(self, ro: Row) -> None:
        rid, now = ro["id"], self.clock()
        cmds = {c["command"]: c for c in self.records.pending_commands(rid)}
        if "cancel" in cmds:
            self._cancel(ro, cmds["cancel"])
            return
        rt = self.records.runtime(rid)
        if rt is None:
            if ro["desired"] == "abort":
                self._set_state(ro, "aborted", 0, "aborted before it started")
                return
            if self.publisher is None:  # no broker: it could assign no one, so it stays pending
                return
            rt = self._begin(ro, now)
            if rt is None:
                return
            ro = self.store.rollouts.get(rid)
        # Revoked devices get no more documents (pending ones leave the cohort, open ones are skipped).
        self.records.drop_revoked(rid, now, reverting=rt["phase"] == "rollback")
        rollback = cmds.get("rollback")
        if rt["phase"] == "rollback":
            self._drive_revert(ro, rt, now)
            return
        if ro["state"] == "completed":
            if rollback is not None:
                self._start_revert(ro, "aborted", f"rollback by {rollback['actor']}: {rollback['note']}")
                self.records.command_done(rollback["id"])
            return
        if ro["desired"] == "abort" or rollback is not None:
            who = rollback["actor"] if rollback else "operator"
            self._start_revert(ro, "aborted", f"abort by {who}")
            if rollback is not None:
                self.records.command_done(rollback["id"])
            return
        cfg = StrategyConfig.parse(ro["strategy"])
        rows = self._observe(rt, cfg, now)
        stage = int(ro["stage"])
        promote = cmds.get("promote")
        if promote is not None and stage < stage_count(cfg) - 1:
            self.records.command_done(promote["id"])
            self._advance(ro, stage + 1, now, f"promoted by {promote['actor']}")
            return
        if ro["desired"] == "pause":
            self._set_state(ro, "paused", stage, "paused by operator")
            return
        breach = rt["breach"] if isinstance(rt["breach"], dict) else {}
        if ro["state"] == "paused":  # resumed: a gate breach of this stage counts as acknowledged
            self._set_state(ro, "running", stage, "resumed")
            if breach:
                breach = {**breach, "acked": True}
                self.records.update_runtime(rid, breach=breach)
        if cfg.include_late_devices and self.records.add_devices(
                rid, self.store.devices.ids_matching(parse_selector(ro["selector"]))):
            rows = self.records.progress(rid)
        counts = outcome_counts(rows)
        acked = bool(breach.get("acked")) and breach.get("stage") == stage
        breaches = [] if acked else self._gates(ro, rt, counts, rows)
        if breaches:
            self._breach(ro, rt, cfg, stage, breaches)
            return
        assigned = [r for r in rows if r["assigned_at"] is not None]
        quota = dispatch_quota(cfg, stage, len(rows), len(assigned), now,
                               [r["assigned_at"] for r in assigned], counts.succeeded)
        if quota > 0:
            fresh = [r for r in rows if r["assigned_at"] is None][:quota]
            assigned += self._assign(rid, rt, cfg, fresh, stage, now)
        target = stage_target(cfg, stage, len(rows))
        now_rows = self.records.progress(rid)
        stage_done = len(assigned) >= target and all(
            r["outcome"] in FINAL_OUTCOMES for r in now_rows if r["assigned_at"] is not None)
        if not stage_done:
            if rt["stage_done_at"] is not None:
                self.records.update_runtime(rid, stage_done_at=None)
            return
        done_at = rt["stage_done_at"]
        if done_at is None:
            done_at = now
            self.records.update_runtime(rid, stage_done_at=now)
        if promote is not None or stage_ready_to_advance(cfg, now, done_at):
            if promote is not None:  # the last stage: promote skips its bake
                self.records.command_done(promote["id"])
            if stage >= stage_count(cfg) - 1:
                self.records.update_runtime(rid, phase="done")
                self._set_state(ro, "completed", stage,
                                f"{counts.succeeded} succeeded, {counts.finished - counts.succeeded} failed")
            else:
                self._advance(ro, stage + 1, now, f"stage {stage} baked {cfg.bake_s:.0f}s, gates clear")

    # -- start, stages, gates ----------------------------------------------------------------------
    def _begin(self, ro: Row, now: float) -> Row | None:
        rid = ro["id"]
        try:
            cfg = StrategyConfig.parse(ro["strategy"])
            GateThresholds.parse(ro["thresholds"])
            ref = self._version_ref(ro["model_version_id"])
            if cfg.shadow_model_version_id:
                self._version_ref(cfg.shadow_model_version_id)
            devices = self.store.devices.ids_matching(parse_selector(ro["selector"]))
        except FleetError as exc:
            self._set_state(ro, "failed", 0, f"cannot start: {exc}")
            return None
        self.records.add_devices(rid, devices)
        rt = self.records.init_runtime(rid, _bundle_id(ref), ref.path, now)
        self._set_state(ro, "running", 0, f"{len(devices)} devices, strategy {cfg.kind}")
        return rt

    def _version_ref(self, version_id: str) -> TargetRef:
        version = self.store.models.get_version_by_id(version_id)
        if not version.bundle_target:
            raise FleetInputError(f"{version_id} has no bundle in the repository (register it from a bundle)")
        return self.repository.target_ref(version.bundle_target)

    def _advance(self, ro: Row, stage: int, now: float, note: str) -> None:
        self.records.update_runtime(ro["id"], stage_started_at=now, stage_done_at=None)
        state = "paused" if ro["desired"] == "pause" else "running"
        self._set_state(ro, state, stage, note)

    def _gates(self, ro: Row, rt: Row, counts: OutcomeCounts, rows: list[Row]) -> list[Breach]:
        t = GateThresholds.parse(ro["thresholds"])
        candidate = baseline = None
        index = bundle_index(self.repository)
        target = index.get(rt["target_bundle"])
        if self.metrics is not None and target is not None:
            candidate = self.metrics.version_metrics(target.name, target.version, rt["started_at"])
            previous = Counter(r["from_bundle"] for r in rows if r["from_bundle"]
                               and r["from_bundle"] != rt["target_bundle"]).most_common(1)
            if previous and previous[0][0] in index:
                prev = index[previous[0][0]]
                baseline = self.metrics.version_metrics(prev.name, prev.version, rt["started_at"])
        agree = self._shadow.get(ro["id"])
        if agree and agree[1] > 0:
            candidate = replace(candidate or VersionMetrics(), shadow_agreement=agree[0] / agree[1])
        return evaluate(t, counts, candidate, baseline)

    def _breach(self, ro: Row, rt: Row, cfg: StrategyConfig, stage: int, breaches: list[Breach]) -> None:
        rid = ro["id"]
        note = "; ".join(b.message for b in breaches)
        self.records.update_runtime(rid, breach={"stage": stage, "acked": False,
                                                 "items": [b.to_dict() for b in breaches]})
        self.store.audit.record(f"{self.config.actor}:gates", "rollout.gate_breach", f"rollouts/{rid}",
                                None, {"stage": stage, "action": cfg.on_breach,
                                       "breaches": [b.to_dict() for b in breaches]})
        log_event(logger, "rollout.gate_breach", logging.WARNING, rollout=rid, action=cfg.on_breach,
                  note=note)
        if cfg.on_breach == "abort":
            self._start_revert(ro, "aborted", f"gate breach: {note}")
            return
        if ro["desired"] != "pause":
            self.store.rollouts.request(rid, "pause", f"{self.config.actor}:gates", note[:1000])
        self._set_state(ro, "paused", stage, f"gate breach: {note}")

    # -- devices ------------------------------------------------------------------------------------
    def _assign(self, rid: str, rt: Row, cfg: StrategyConfig, rows: list[Row], stage: int,
                now: float) -> list[Row]:
        if self.publisher is None or not rows:
            return []
        ref = self.repository.target_ref(rt["target_path"])
        shadow = self._version_ref(cfg.shadow_model_version_id) if cfg.shadow_model_version_id else None
        reports = self.records.reported_states([r["device_id"] for r in rows])
        published: list[Row] = []
        for r in rows:
            dev = r["device_id"]
            try:
                doc = self.signer.issue(ref, device_id=dev, shadow=shadow, ttl=self.config.document_ttl,
                                        rollout_id=rid, reason=f"rollout {rid} stage {stage}")
                self.publisher.publish_desired(device_id=dev, document=doc)
            except FleetTransportError as exc:
                log_event(logger, "rollout.publish_failed", logging.WARNING, rollout=rid, device=dev,
                          error=str(exc))
                break
            published.append(r)
        # One transaction for the batch (a stage can be a thousand devices). A crash before it
        # commits leaves them pending: the next tick sends newer documents, which is harmless.
        done: list[Row] = []
        with self.store.tx():
            for r in published:
                dev = r["device_id"]
                rep = (reports.get(dev) or {}).get("reported_state") or {}
                self.records.supersede(dev, rid)
                self.records.update_device(rid, dev, "assigned", stage=stage, assigned_at=now,
                                           from_bundle=rep.get("active_bundle"), acked=0, detail="")
                done.append({**r, "assigned_at": now})
        log_event(logger, "rollout.assigned", rollout=rid, stage=stage, devices=len(done))
        return done

    def _observe(self, rt: Row, cfg: StrategyConfig, now: float) -> list[Row]:
        """Fold reported states and timeouts into the forward outcomes; returns fresh rows."""
        rid, target = rt["rollout_id"], rt["target_bundle"]
        rows = self.records.progress(rid)
        open_rows = [r for r in rows if r["assigned_at"] is not None and r["outcome"] in (None, "timeout")]
        reports = self.records.reported_states([r["device_id"] for r in open_rows])
        changed = False
        for r in open_rows:
            rep = (reports.get(r["device_id"]) or {}).get("reported_state") or {}
            state, active = rep.get("state"), rep.get("active_bundle")
            fresh = float(rep.get("timestamp") or 0) >= r["assigned_at"] - self.config.clock_skew_s
            if r["from_bundle"] is None:  # offline when assigned (its Last Will names no bundle)
                known = rep.get("previous_bundle") if active == target else active
                if known and known != target:
                    self.records.update_device(rid, r["device_id"], from_bundle=known)
                    changed = True
            if state == "idle" and active == target:
                detail = "committed after the timeout" if r["outcome"] == "timeout" else "committed"
                self.records.update_device(rid, r["device_id"], "succeeded", outcome="succeeded",
                                           detail=detail)
                changed = True
            elif r["outcome"] is None and now - r["assigned_at"] > cfg.device_timeout_s:
                self.records.update_device(
                    rid, r["device_id"], "failed", outcome="timeout",
                    detail=f"no commit within {cfg.device_timeout_s:.0f}s (last state {state or 'unknown'})")
                changed = True
            elif r["outcome"] is None and fresh:
                status = PROGRESS_STATUS.get(str(state))
                if status and status != r["status"]:
                    self.records.update_device(rid, r["device_id"], status)
                    changed = True
        return self.records.progress(rid) if changed else rows

    def _apply_events(self) -> None:
        while self._events:
            dev, ev = self._events.popleft()
            for e in self.records.open_entries_for(dev):
                self._apply_event(e, dev, ev)

    def _apply_event(self, e: Row, dev: str, ev: Event) -> None:
        rid, target = e["rollout_id"], e["target_bundle"]
        if e["phase"] == "rollback":
            if ev.type == "director_accepted" and ev.bundle_id == e["from_bundle"]:
                self.records.update_device(rid, dev, acked=1)
            return
        if ev.type == "shadow_report" and "label_agreement" in ev.measurements:
            n = max(1.0, ev.measurements.get("compared", 1.0))
            total, count = self._shadow.get(rid, (0.0, 0.0))
            self._shadow[rid] = (total + ev.measurements["label_agreement"] * n, count + n)
            return
        if ev.bundle_id != target and ev.type != "director_refused":
            return
        if ev.type == "committed":
            self.records.update_device(rid, dev, "succeeded", outcome="succeeded", detail="committed")
        elif e["outcome"] is not None:
            return
        elif ev.type == "director_accepted":
            self.records.update_device(rid, dev, acked=1)
        elif ev.type == "rolled_back":
            self.records.update_device(rid, dev, "rolled_back", outcome="local_rollback",
                                       detail=f"rolled back on the device: {ev.reason}"[:1000])
        elif ev.type == "update_failed":
            self.records.update_device(rid, dev, "failed", outcome="install_failed",
                                       detail=f"install failed: {ev.reason}"[:1000])
        elif ev.type == "director_refused" and not e["acked"] and ev.timestamp >= e["assigned_at"] - \
                self.config.clock_skew_s:
            self.records.update_device(rid, dev, "failed", outcome="install_failed",
                                       detail=f"director document refused: {ev.reason}"[:1000])

    # -- abort / rollback / cancel ----------------------------------------------------------------
    def _start_revert(self, ro: Row, final_state: str, note: str) -> None:
        self.records.update_runtime(ro["id"], phase="rollback", final_state=final_state)
        self._set_state(ro, "rolling_back", int(ro["stage"]), note)

    def _drive_revert(self, ro: Row, rt: Row, now: float) -> None:
        rid, target = ro["id"], rt["target_bundle"]
        cfg = StrategyConfig.parse(ro["strategy"])
        rows = self.records.progress(rid)
        index = bundle_index(self.repository)
        reports = self.records.reported_states([r["device_id"] for r in rows if r["outcome"] == "reverting"])
        for r in rows:
            dev, prev = r["device_id"], r["from_bundle"]
            if r["revert_at"] is None:
                why = ("never assigned" if r["assigned_at"] is None else
                       "no previous bundle to return to" if prev is None else
                       "ran this bundle before the rollout" if prev == target else None)
                if why is None and prev not in index:
                    self.records.update_device(rid, dev, "failed", outcome="revert_failed", revert_at=now,
                                               detail=f"previous bundle {prev} is not in the repository")
                elif why is not None:
                    self.records.update_device(rid, dev, "skipped", outcome="skipped", revert_at=now,
                                               detail=f"not reverted: {why}")
                elif self.publisher is not None:
                    try:
                        doc = self.signer.issue(index[prev], device_id=dev, ttl=self.config.document_ttl,
                                                rollout_id=rid, reason=f"rollback of {rid}")
                        self.publisher.publish_desired(device_id=dev, document=doc)
                    except FleetTransportError as exc:
                        log_event(logger, "rollout.publish_failed", logging.WARNING, rollout=rid, device=dev,
                                  error=str(exc))
                        return
                    self.records.update_device(rid, dev, outcome="reverting", revert_at=now, acked=0,
                                               detail=f"returning to {prev} ({r['outcome'] or 'in flight'})")
            elif r["outcome"] == "reverting":
                rep = (reports.get(dev) or {}).get("reported_state") or {}
                fresh = float(rep.get("timestamp") or 0) >= r["revert_at"] - self.config.clock_skew_s
                if rep.get("state") == "idle" and rep.get("active_bundle") == prev and (r["acked"] or fresh):
                    self.records.update_device(rid, dev, "rolled_back", outcome="reverted",
                                               detail=f"back on {prev}")
                elif now - r["revert_at"] > cfg.revert_timeout_s:
                    self.records.update_device(rid, dev, "failed", outcome="revert_failed",
                                               detail=f"not back on {prev} within "
                                                      f"{cfg.revert_timeout_s:.0f}s")
        rows = self.records.progress(rid)
        if all(r["outcome"] in ("reverted", "revert_failed", "skipped") for r in rows):
            self.records.update_runtime(rid, phase="done")
            back = sum(r["outcome"] == "reverted" for r in rows)
            self._set_state(ro, rt["final_state"] or "aborted", int(ro["stage"]),
                            f"{back} devices back on their previous bundle, "
                            f"{sum(r['outcome'] == 'revert_failed' for r in rows)} failed to return")

    def _cancel(self, ro: Row, cmd: Row) -> None:
        rid = ro["id"]
        for r in self.records.progress(rid):
            if r["outcome"] not in FINAL_OUTCOMES:
                self.records.update_device(rid, r["device_id"], "skipped", outcome="skipped",
                                           detail="rollout cancelled; device left as it is")
        with contextlib.suppress(FleetError):
            if self.records.runtime(rid) is not None:
                self.records.update_runtime(rid, phase="done")
        self.records.command_done(cmd["id"])
        self._set_state(ro, "cancelled", int(ro["stage"]), f"cancelled by {cmd['actor']}: {cmd['note']}")



def _bundle_id(ref: TargetRef) -> str:
    return f"{ref.name}-{ref.version}"
