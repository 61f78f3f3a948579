"""The concrete state handlers: download, verify, stage, activate, probation, commit, rollback.

Each handler does one state's work against the context and *returns* an `Event`; the
table in `machine.py` decides what comes next. Handlers are idempotent because the
driver may re-run one after a crash (the record is saved before each runs). Every outcome
that matters to an operator is reported through the injected `EventSink` with a reason
and measurements. Collaborators (trust client, extractor, model loader) are small
protocols with the real implementations as defaults.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.contract.bundle import extract_bundle
from agent.contract.director import TargetRef
from agent.contract.manifest import Manifest
from agent.contract.strict import ValidationError
from agent.contract.windows import UpdateWindows
from agent.durable_io import fsync_dir, fsync_file
from agent.errors import (
    EdgefleetError,
    InferenceTimeoutError,
    MisuseError,
    RuntimeFailure,
    TransportError,
    UntrustedDataError,
)
from agent.lifecycle.delta_fetch import fetch_by_delta
from agent.lifecycle.health import Probation, check_golden, fmt_measurements, run_with_deadline
from agent.lifecycle.holds import Hold, Step, apply_hold, resource_hold, window_hold
from agent.lifecycle.machine import Event, Handler, State
from agent.lifecycle.resources import ResourcePolicy, ResourceProbe, probe_system
from agent.lifecycle.slots import Extracted, SlotBundle, Slots, is_quarantined, quarantine
from agent.lifecycle.state_store import DesiredTarget, StateRecord
from agent.logs import log_event
from agent.runtimes import load_model
from agent.serving.model_holder import LoadedModel, ModelHolder

log = logging.getLogger(__name__)


class TrustSource(Protocol):
    """`agent.trust.client.TrustClient`: refresh metadata, then download a verified target."""

    def download_target(self, target_path: str, expected: TargetRef | None = None) -> Path: ...


class ExtractFn(Protocol):
    """`agent.contract.bundle.extract_bundle` (only the arguments used here)."""

    def __call__(
        self,
        bundle: Path,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        expected_length: int | None = None,
    ) -> Extracted: ...


ModelLoader = Callable[[Path, Manifest, int], LoadedModel]
#: Reports one lifecycle event: (name, fields). The daemon publishes these over MQTT.
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class LifecycleConfig:
    """Limits of the lifecycle (all explicit; see docs/lifecycle.md)."""

    state_dir: Path
    runtime_threads: int = 1
    load_timeout_s: float = 30.0  # first load + warm-up of a new model
    max_entries: int = 3  # entries into one state for one bundle before a forced rollback
    max_crash_recoveries: int = 3
    retry_base_s: float = 5.0  # download retry backoff: base * 2**failures, capped
    retry_max_s: float = 600.0
    probation_poll_s: float = 0.01
    probation_max_wait_s: float | None = None  # default: max(10 x probation_seconds, 60 s)
    # Left free beyond an update's own peak, for the state record, events and telemetry.
    disk_reserve_bytes: int = 256 * 1024
    # Maintenance windows without a zone of their own are read in this one (None: UTC).
    timezone: str | None = None
    # Free disk / memory / CPU an update needs before its download and its activation (holds).
    resources: ResourcePolicy = field(default_factory=ResourcePolicy)

    def __post_init__(self) -> None:
        if self.runtime_threads < 1 or self.load_timeout_s <= 0 or self.max_entries < 1:
            raise MisuseError("runtime_threads, load_timeout_s and max_entries must be positive")


def _default_loader(model_path: Path, manifest: Manifest, threads: int) -> LoadedModel:
    return load_model(model_path, manifest, threads=threads)


def _default_extract(
    bundle: Path, dest: Path, *, expected_sha256: str | None = None, expected_length: int | None = None
) -> Extracted:
    return extract_bundle(bundle, dest, expected_sha256=expected_sha256, expected_length=expected_length)


@dataclass
class LifecycleContext:
    """Everything the handlers touch; `record` is the persisted part."""

    record: StateRecord
    config: LifecycleConfig
    slots: Slots
    holder: ModelHolder
    trust: TrustSource
    emit: EventSink
    load: ModelLoader = _default_loader
    extract: ExtractFn = _default_extract
    clock: Callable[[], float] = time.time
    wake: threading.Event = field(default_factory=threading.Event)
    rollback_flag: threading.Event = field(default_factory=threading.Event)
    health_failed_at: float | None = None  # perf_counter() when a failure was seen
    shadow_retry_at: float = 0.0  # transport backoff for the shadow download (not persisted)
    probe: ResourceProbe = probe_system  # what is free now (tests inject a device short of memory)
    _pending: DesiredTarget | None = None
    _pending_lock: threading.Lock = field(default_factory=threading.Lock)

    def offer_desired(self, target: DesiredTarget) -> None:
        """Thread-safe hand-off of a new desired target (applied by the next handler)."""
        with self._pending_lock:
            if self._pending is None or target.sequence > self._pending.sequence:
                self._pending = target
        self.wake.set()

    def superseding(self, bundle_id: str) -> DesiredTarget | None:
        """The pending desired target if it is newer than the applied one and names another bundle."""
        with self._pending_lock:
            target = self._pending
        if target is None or target.sequence <= self.record.director_sequence:
            return None
        return None if target.bundle_id == bundle_id else target

    def apply_pending(self) -> None:
        with self._pending_lock:
            target, self._pending = self._pending, None
        r = self.record
        if target is None or target.sequence <= r.director_sequence:
            return
        r.desired = target
        r.director_sequence = target.sequence
        r.attempts.clear()
        r.download_failures = 0
        r.retry_at = 0.0

    def report(self, name: str, **fields: Any) -> None:
        fields.setdefault("active", self.record.active)
        log_event(log, f"lifecycle.{name}", **{k: v for k, v in fields.items() if not isinstance(v, dict)})
        try:
            self.emit(name, fields)
        except Exception:  # a broken sink must not break the lifecycle
            log.exception("event sink failed for %s", name)

    def fail(self, reason: str, measurements: dict[str, float] | None = None) -> None:
        self.record.last_error = reason
        self.record.last_measurements = fmt_measurements(measurements or {})
        self.health_failed_at = time.perf_counter()

    def previous_serving(self) -> None:
        """Record how long it took from the failure to the previous model serving again."""
        if self.health_failed_at is not None:
            served_at = max(self.holder.last_swap_at, self.health_failed_at)  # the reference swap
            elapsed = (served_at - self.health_failed_at) * 1000.0
            self.record.last_measurements["rollback_ms"] = round(elapsed, 3)


def _load_checked(ctx: LifecycleContext, slot: SlotBundle) -> LoadedModel:
    """Re-hash, load and warm a slot's model under the watchdog."""
    ctx.slots.verify_model(slot)
    timeout = max(ctx.config.load_timeout_s, slot.manifest.health.inference_timeout_s)
    threads = ctx.config.runtime_threads
    return run_with_deadline(lambda: ctx.load(slot.model_path, slot.manifest, threads), timeout, "load")


# --- handlers ---------------------------------------------------------------------------
def handle_idle(ctx: LifecycleContext) -> Event:
    """Serve `active` (reload it after a restart); start an update if the target moved."""
    ctx.apply_pending()
    ctx.rollback_flag.clear()  # a rollback request means "abort this update": none is running
    r = ctx.record
    if r.active and ctx.holder.bundle_id != r.active:
        try:
            model = _load_checked(ctx, ctx.slots.open(r.active))
        except EdgefleetError as exc:
            r.candidate = r.active
            ctx.fail(f"active bundle {r.active} no longer loads: {exc}")
            return Event.LOAD_FAILED
        ctx.holder.swap(model, r.active, keep_previous=False)
        ctx.report("serving", bundle=r.active)
    _sync_shadow(ctx)
    d = r.desired
    if d is None or d.bundle_id == r.active:
        return Event.NO_CHANGE
    if is_quarantined(r, d.bundle_id, d.sequence) or ctx.clock() < r.retry_at:
        return Event.NO_CHANGE
    if not ctx.slots.has(d.bundle_id) and held(ctx, d, "download"):
        return Event.NO_CHANGE  # outside the download window, or short of resources
    r.candidate = d.bundle_id
    r.last_error = None
    r.last_measurements = {}
    if ctx.slots.has(d.bundle_id):
        r.staged = d.bundle_id
        ctx.report("update_started", bundle=d.bundle_id, sequence=d.sequence, download=False)
        return Event.FOUND_ON_DISK
    ctx.report("update_started", bundle=d.bundle_id, sequence=d.sequence, download=True)
    return Event.DESIRED_CHANGED


def _target_ref(d: DesiredTarget) -> TargetRef:
    return TargetRef(path=d.path, length=d.length, sha256=d.sha256, name=d.name, version=d.version)


def disk_shortfall(ctx: LifecycleContext, d: DesiredTarget) -> str | None:
    """Why `d` cannot fit on the disk of the state directory, or None when it can.

    Checked before the first byte is written: an install holds the bundle twice at its peak
    (the spool file and TUF's copy while downloading, TUF's copy and the extracted slot while
    staging), and a disk filled by a half-written bundle would leave no room for what the
    fleet must hear about it (the state record, the event outbox, telemetry).
    """
    need = 2 * d.length + ctx.config.disk_reserve_bytes
    try:
        free = shutil.disk_usage(ctx.config.state_dir).free
    except OSError:
        return None  # no answer: the download's own errors decide
    if free >= need:
        return None
    return (
        f"disk full: {d.bundle_id} needs {need} bytes free (2 x {d.length} + "
        f"{ctx.config.disk_reserve_bytes} reserve), {free} free on the state directory's disk"
    )


def _fetch(ctx: LifecycleContext, d: DesiredTarget) -> Path:
    """The delta the director named for our active bundle if it rebuilds `d`, else the full bundle."""
    full = _target_ref(d)
    outcome = fetch_by_delta(ctx.trust, ctx.slots, ctx.record.active, d, full)
    if outcome is not None and outcome.path is not None:
        ctx.report("delta_applied", bundle=d.bundle_id, measurements={
            "fetched_bytes": outcome.fetched_bytes, "full_bytes": d.length, "rebuild_ms": outcome.rebuild_ms})
        return outcome.path
    if outcome is not None:
        ctx.report("delta_fallback", bundle=d.bundle_id, reason=outcome.reason)
    return ctx.trust.download_target(d.path, full)


def handle_downloading(ctx: LifecycleContext) -> Event:
    ctx.apply_pending()
    r = ctx.record
    d = r.desired
    if d is None or d.bundle_id != r.candidate:
        r.last_error = "superseded by a newer desired target"
        return Event.SUPERSEDED
    try:
        short = disk_shortfall(ctx, d)
        if short is not None:  # retried like a transport failure: space may be freed meanwhile
            raise MisuseError(short)
        path = _fetch(ctx, d)
        # python-tuf writes it without an fsync: durable before the record names it, or a power
        # cut leaves `verifying` a torn file that fails its hash and quarantines a good bundle.
        try:
            fsync_file(path)
            fsync_dir(path.parent)
        except OSError as exc:
            raise MisuseError(f"cannot make the download durable: {exc}") from exc
    except UntrustedDataError as exc:
        ctx.fail(f"download refused: {exc}")
        return Event.VERIFY_FAILED
    except (TransportError, MisuseError) as exc:
        r.download_failures += 1
        delay = min(ctx.config.retry_max_s, ctx.config.retry_base_s * 2 ** (r.download_failures - 1))
        r.retry_at = ctx.clock() + delay
        r.last_error = f"download failed (retry in {delay:.0f}s): {exc}"
        return Event.DOWNLOAD_FAILED
    r.download_path = str(path)
    r.download_failures = 0
    r.retry_at = 0.0
    return Event.DOWNLOADED


def handle_verifying(ctx: LifecycleContext) -> Event:
    r = ctx.record
    d = r.desired
    if d is None or d.bundle_id != r.candidate:
        r.last_error = "superseded by a newer desired target"
        return Event.DOWNLOAD_FAILED
    if not r.download_path or not Path(r.download_path).is_file():
        r.last_error = "downloaded bundle is gone; fetching again"
        return Event.DOWNLOAD_FAILED
    try:
        ctx.slots.install(
            d.bundle_id,
            Path(r.download_path),
            lambda src, dest: ctx.extract(src, dest, expected_sha256=d.sha256, expected_length=d.length),
        )
    except UntrustedDataError as exc:
        ctx.fail(f"bundle refused: {exc}")
        return Event.VERIFY_FAILED
    except MisuseError as exc:
        r.last_error = f"extraction failed: {exc}"
        return Event.DOWNLOAD_FAILED
    with contextlib.suppress(OSError):  # the trust client's cached copy; the slot is the truth
        Path(r.download_path).unlink()
    r.download_path = None
    r.staged = d.bundle_id
    ctx.report("staged", bundle=d.bundle_id)
    return Event.VERIFIED


def handle_staged(ctx: LifecycleContext) -> Event:
    ctx.apply_pending()
    r = ctx.record
    if r.desired is None or r.desired.bundle_id != r.staged:
        r.last_error = "superseded by a newer desired target"
        return Event.SUPERSEDED
    if (r.hold and ctx.clock() < r.retry_at) or held(ctx, r.desired, "activation"):
        return Event.HOLD  # verified and on disk; activated in its window, with resources to spare
    return Event.DONE


def _windows(d: DesiredTarget) -> UpdateWindows | None:
    """The document's windows (verified with it; a record that no longer parses means none)."""
    try:
        return UpdateWindows.model_validate(d.windows) if d.windows else None
    except ValidationError:
        return None


def held(ctx: LifecycleContext, d: DesiredTarget, step: Step) -> bool:
    """Whether `step` of `d` must wait: outside its window, or the device short of resources.

    Records the hold (or its end) and reports it; see `agent.lifecycle.holds`.
    """
    now = ctx.clock()
    hold: Hold | None = window_hold(_windows(d), step, ctx.config.timezone, now)
    if hold is None:
        disk = 2 * d.length if step == "download" else 0
        memory = 0.0
        if step == "activation" and ctx.slots.has(d.bundle_id):
            with contextlib.suppress(EdgefleetError, OSError):
                memory = float(ctx.slots.open(d.bundle_id).manifest.compatibility.min_memory_mb)
        hold = resource_hold(ctx.config.resources, ctx.probe(ctx.config.state_dir), ctx.record.holds, now,
                             disk, memory)
    return apply_hold(ctx.record, hold, ctx.report, d.bundle_id)


def handle_activating(ctx: LifecycleContext) -> Event:
    """Load + warm beside the serving model, golden vectors, then swap the reference."""
    r = ctx.record
    bid = r.staged or r.candidate
    if bid is None:
        ctx.fail("nothing staged to activate")
        return Event.LOAD_FAILED
    try:
        slot = ctx.slots.open(bid)
        model = _load_checked(ctx, slot)
    except InferenceTimeoutError as exc:
        ctx.fail(f"load hung: {exc}")
        return Event.TIMEOUT
    except EdgefleetError as exc:
        ctx.fail(f"load failed: {exc}")
        return Event.LOAD_FAILED
    timeout = slot.manifest.health.inference_timeout_s
    try:
        golden = run_with_deadline(lambda: check_golden(model, slot.manifest), timeout, "golden")
    except InferenceTimeoutError as exc:  # the model is still in use by the hung thread: leak it
        ctx.fail(f"golden vectors hung: {exc}", {"inference_timeout_s": timeout})
        return Event.TIMEOUT
    except Exception as exc:
        model.close()
        ctx.fail(f"golden vectors raised: {type(exc).__name__}: {exc}")
        return Event.HEALTH_FAILED
    if not golden.ok:
        model.close()
        ctx.fail(f"golden vectors failed: {golden.reason}", golden.measurements())
        return Event.HEALTH_FAILED
    ctx.holder.swap(model, bid, keep_previous=True)
    if r.active != bid:
        r.previous, r.active = r.active, bid
    r.staged = None
    ctx.report("activated", bundle=bid, measurements=fmt_measurements(golden.measurements()))
    return Event.GOLDEN_OK


def handle_probation(ctx: LifecycleContext) -> Event:
    r = ctx.record
    bid = r.active
    if bid is None or ctx.holder.bundle_id != bid:
        ctx.fail(f"probation without {bid} serving")
        return Event.HEALTH_FAILED
    policy = ctx.slots.open(bid).manifest.health
    probation = Probation(policy, max_wait_s=ctx.config.probation_max_wait_s)

    def observe(bundle: str, latency_s: float, ok: bool) -> None:
        if bundle == bid:
            probation.observe(latency_s, ok)

    def rejected(bundle: str) -> None:  # a client-visible 400 from the new model counts against it
        if bundle == bid:
            probation.observe_rejected()

    ctx.holder.add_observer(observe)
    ctx.holder.add_reject_observer(rejected)
    try:
        while True:
            if ctx.rollback_flag.is_set():
                ctx.rollback_flag.clear()
                ctx.fail("operator requested rollback")
                return Event.ROLLBACK_REQUESTED
            newer = ctx.superseding(bid)
            if newer is not None:  # e.g. the operator's rollback order: it must not wait for the window
                ctx.fail(f"superseded during probation by director sequence {newer.sequence} "
                         f"({newer.bundle_id})")
                return Event.SUPERSEDED
            stuck = ctx.holder.oldest_inflight_s()
            if stuck > policy.inference_timeout_s:
                ctx.fail(f"a request hung for {stuck:.2f}s (timeout {policy.inference_timeout_s}s)",
                         {"stuck_s": stuck})
                _fail_fast(ctx)
                return Event.TIMEOUT
            verdict = probation.verdict()
            if verdict is not None:
                if verdict.ok:
                    r.last_measurements = fmt_measurements(verdict.measurements)
                    return Event.HEALTH_OK
                ctx.fail(f"probation failed: {verdict.reason}", verdict.measurements)
                _fail_fast(ctx)
                return Event.HEALTH_FAILED
            ctx.wake.wait(ctx.config.probation_poll_s)
            ctx.wake.clear()
    finally:
        ctx.holder.remove_observer(observe)
        ctx.holder.remove_reject_observer(rejected)


def _fail_fast(ctx: LifecycleContext) -> None:
    """Stop serving a model that just failed probation *now*: swap the warm standby back.

    Only the in-memory reference moves; the record still says `probation` until
    `rolling_back` runs (a crash in between resumes into `rolling_back` anyway), so the
    time a failing model serves is one reference swap, not a state save plus a swap.
    """
    if ctx.holder.standby_id is not None and ctx.holder.standby_id == ctx.record.previous:
        ctx.holder.revert()
        ctx.previous_serving()


def handle_committed(ctx: LifecycleContext) -> Event:
    r = ctx.record
    ctx.holder.drop_standby()
    ctx.report("committed", bundle=r.active, previous=r.previous, measurements=dict(r.last_measurements))
    r.candidate = r.staged = None
    r.attempts.clear()
    r.last_error = None
    ctx.slots.gc(r)
    return Event.DONE


def handle_rolling_back(ctx: LifecycleContext) -> Event:
    """Serve the previous slot again and quarantine the candidate."""
    r = ctx.record
    bad = r.candidate
    swapped = bad is not None and r.active == bad
    if bad:
        quarantine(r, bad)
    if swapped:
        target = r.previous
        if target is None:
            ctx.holder.clear()
        elif ctx.holder.bundle_id != target and not (ctx.holder.standby_id == target and ctx.holder.revert()):
            try:
                model = _load_checked(ctx, ctx.slots.open(target))
            except EdgefleetError as exc:
                r.last_error = f"{r.last_error}; previous bundle {target} does not load either: {exc}"
                return Event.LOAD_FAILED
            ctx.holder.swap(model, target, keep_previous=False)
        ctx.previous_serving()
        r.active, r.previous = target, None
    ctx.holder.drop_standby()
    measurements = dict(r.last_measurements)
    if ctx.health_failed_at is not None:  # failure seen -> record saved, quarantined, serving
        measurements["rollback_complete_ms"] = round((time.perf_counter() - ctx.health_failed_at) * 1e3, 3)
        ctx.health_failed_at = None
    ctx.report("rolled_back", bundle=bad, swapped=swapped, reason=r.last_error or "",
               quarantined_at_sequence=r.quarantined.get(bad or "", 0), measurements=measurements)
    r.candidate = r.staged = r.download_path = None
    ctx.slots.gc(r)
    return Event.DONE


def handle_failed(ctx: LifecycleContext) -> Event:
    r = ctx.record
    ctx.report("update_failed", bundle=r.candidate, reason=r.last_error or "unknown",
               measurements=dict(r.last_measurements))
    if ctx.holder.bundle_id == r.active:
        ctx.holder.drop_standby()
    r.candidate = r.staged = None
    ctx.slots.gc(r)
    return Event.DONE


def _sync_shadow(ctx: LifecycleContext) -> None:
    """Keep the shadow candidate named by the director loaded (never served)."""
    r = ctx.record
    want = r.desired.shadow if r.desired else None
    if want is None or want.bundle_id == r.active:
        if r.shadow or ctx.holder.shadow_id:
            ctx.holder.set_shadow(None)
            r.shadow = None
        return
    if ctx.holder.shadow_id == want.bundle_id or is_quarantined(r, want.bundle_id, want.sequence):
        return
    if ctx.clock() < ctx.shadow_retry_at:
        return
    try:
        if not ctx.slots.has(want.bundle_id):
            path = ctx.trust.download_target(want.path, _target_ref(want))
            ctx.slots.install(
                want.bundle_id,
                path,
                lambda src, dest: ctx.extract(
                    src, dest, expected_sha256=want.sha256, expected_length=want.length
                ),
            )
        model = _load_checked(ctx, ctx.slots.open(want.bundle_id))
    except (UntrustedDataError, RuntimeFailure) as exc:
        quarantine(r, want.bundle_id)
        ctx.report("shadow_failed", bundle=want.bundle_id, reason=str(exc))
        return
    except (TransportError, MisuseError) as exc:
        ctx.shadow_retry_at = ctx.clock() + ctx.config.retry_base_s
        ctx.report("shadow_deferred", bundle=want.bundle_id, reason=str(exc))
        return
    ctx.holder.set_shadow(model, want.bundle_id)
    r.shadow = want.bundle_id
    ctx.report("shadow_started", bundle=want.bundle_id)


HANDLERS: dict[State, Handler] = {
    State.IDLE: handle_idle,  # type: ignore[dict-item]
    State.DOWNLOADING: handle_downloading,  # type: ignore[dict-item]
    State.VERIFYING: handle_verifying,  # type: ignore[dict-item]
    State.STAGED: handle_staged,  # type: ignore[dict-item]
    State.ACTIVATING: handle_activating,  # type: ignore[dict-item]
    State.PROBATION: handle_probation,  # type: ignore[dict-item]
    State.COMMITTED: handle_committed,  # type: ignore[dict-item]
    State.ROLLING_BACK: handle_rolling_back,  # type: ignore[dict-item]
    State.FAILED: handle_failed,  # type: ignore[dict-item]
}
