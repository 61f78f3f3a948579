"""The download half of the lifecycle's handlers (idle, download, verify, stage), and `HANDLERS`.

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
from pathlib import Path

from agent.contract.strict import ValidationError
from agent.contract.windows import UpdateWindows
from agent.durable_io import fsync_dir, fsync_file
from agent.errors import (
    EdgefleetError,
    MisuseError,
    RuntimeFailure,
    TransportError,
    UntrustedDataError,
)
from agent.lifecycle.activation import (
    handle_activating,
    handle_committed,
    handle_failed,
    handle_probation,
    handle_rolling_back,
)
from agent.lifecycle.context import LifecycleContext, load_checked, target_ref_of
from agent.lifecycle.delta_fetch import fetch_by_delta
from agent.lifecycle.holds import Hold, Step, apply_hold, resource_hold, window_hold
from agent.lifecycle.machine import Event, Handler, State
from agent.lifecycle.slots import is_quarantined, quarantine
from agent.lifecycle.state_store import DesiredTarget

log = logging.getLogger(__name__)


def handle_idle(ctx: LifecycleContext) -> Event:
    """Serve `active` (reload it after a restart); start an update if the target moved."""
    ctx.apply_pending()
    ctx.rollback_flag.clear()  # a rollback request means "abort this update": none is running
    r = ctx.record
    if r.active and ctx.holder.bundle_id != r.active:
        try:
            model = load_checked(ctx, ctx.slots.open(r.active))
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
    full = target_ref_of(d)
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
            path = ctx.trust.download_target(want.path, target_ref_of(want))
            ctx.slots.install(
                want.bundle_id,
                path,
                lambda src, dest: ctx.extract(
                    src, dest, expected_sha256=want.sha256, expected_length=want.length
                ),
            )
        model = load_checked(ctx, ctx.slots.open(want.bundle_id))
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
