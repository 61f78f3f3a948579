"""The activation half of the lifecycle's handlers: activate, probation, commit, rollback, failed.

Each handler does one state's work against the context and *returns* an `Event`; the table in
`machine.py` decides what comes next (see `install.py` for the download half and `HANDLERS`).
Handlers are idempotent: the driver may re-run one after a crash (the record is saved first).
"""

from __future__ import annotations

import logging
import time

from agent.errors import (
    EdgefleetError,
    InferenceTimeoutError,
)
from agent.lifecycle.context import LifecycleContext, load_checked
from agent.lifecycle.health import Probation, check_golden, fmt_measurements, run_with_deadline
from agent.lifecycle.machine import Event
from agent.lifecycle.slots import quarantine

log = logging.getLogger(__name__)


def handle_activating(ctx: LifecycleContext) -> Event:
    """Load + warm beside the serving model, golden vectors, then swap the reference."""
    r = ctx.record
    bid = r.staged or r.candidate
    if bid is None:
        ctx.fail("nothing staged to activate")
        return Event.LOAD_FAILED
    try:
        slot = ctx.slots.open(bid)
        model = load_checked(ctx, slot)
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
                model = load_checked(ctx, ctx.slots.open(target))
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
