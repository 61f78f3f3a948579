"""`Lifecycle`: the one object the daemon holds (state store + slots + machine + handlers)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.lifecycle.context import (
    EventSink,
    ExtractFn,
    LifecycleConfig,
    LifecycleContext,
    ModelLoader,
    TrustSource,
    default_extract,
    default_loader,
)
from agent.lifecycle.install import HANDLERS
from agent.lifecycle.machine import LoopLimits, Machine, State
from agent.lifecycle.slots import Slots
from agent.lifecycle.state_store import DesiredTarget, StateRecord, StateStore
from agent.logs import log_event
from agent.serving.model_holder import ModelHolder

#: Longest rest in `idle` without stepping the machine (see `Lifecycle.run_forever`).
IDLE_RECHECK_S = 30.0
#: Longest wait before retrying after a step failed (the state could not be saved, ...).
MAX_STEP_BACKOFF_S = 60.0
log = logging.getLogger(__name__)


class Lifecycle:
    """Install/activate/rollback for one device; resumes from its state record.

    Thread model: `offer_desired` and `request_rollback` may be called from any thread
    (e.g. the MQTT callback); `start`/`run_until_stable`/`run_forever` run in one thread.
    """

    def __init__(
        self,
        config: LifecycleConfig,
        holder: ModelHolder,
        trust: TrustSource,
        emit: EventSink | None = None,
        load: ModelLoader = default_loader,
        extract: ExtractFn = default_extract,
        clock: Callable[[], float] = time.time,
        on_save: Callable[[StateRecord], None] | None = None,
    ) -> None:
        """`on_save` is called after every successful record save (e.g. to publish state)."""
        self.store = StateStore(config.state_dir, clock=clock, after_save=on_save)
        self.ctx = LifecycleContext(
            record=self.store.load(),
            config=config,
            slots=Slots(config.state_dir),
            holder=holder,
            trust=trust,
            emit=emit or (lambda name, fields: None),
            load=load,
            extract=extract,
            clock=clock,
        )
        limits = LoopLimits(config.max_entries, config.max_crash_recoveries)
        self.machine = Machine(self.store, self.ctx, HANDLERS, limits)

    @property
    def record(self) -> StateRecord:
        return self.ctx.record

    @property
    def state(self) -> State:
        return self.machine.state

    def start(self) -> State:
        """Resume after a (possible) crash and settle. Call once, before serving."""
        self.machine.resume()
        return self.machine.run_until_stable()

    def offer_desired(self, target: DesiredTarget | Any) -> None:
        """Hand over a verified director document (or a `DesiredTarget`); thread-safe.

        Older or equal sequences are ignored (messages may arrive twice or out of order).
        """
        if not isinstance(target, DesiredTarget):
            target = DesiredTarget.from_director(target)
        self.ctx.offer_desired(target)

    def request_rollback(self) -> None:
        """Abort a running probation and roll back (local operator action); thread-safe."""
        self.ctx.rollback_flag.set()
        self.ctx.wake.set()

    def run_until_stable(self) -> State:
        return self.machine.run_until_stable()

    def _timer_due(self) -> bool:
        """A backoff (update retry or shadow download) has run out: idle has work to do."""
        now = self.ctx.clock()
        return 0 < self.record.retry_at <= now or 0 < self.ctx.shadow_retry_at <= now

    def run_forever(
        self,
        stop: threading.Event,
        poll_s: float = 1.0,
        on_tick: Callable[[], None] | None = None,
        idle_recheck_s: float = IDLE_RECHECK_S,
    ) -> None:
        """Settle, then wait for a new target (or `poll_s`), until `stop` is set.

        Resting in `idle` with nothing new, the machine is not stepped on every poll (each
        step fingerprints the record): only when woken (a new target, a rollback request, a
        reconnect), when a backoff ran out, or every `idle_recheck_s` as a safety net.
        `on_tick` (the watchdog heartbeat) still runs on every poll.
        """
        woken, last_step, failures = True, float("-inf"), 0
        while not stop.is_set():
            now = time.monotonic()
            if (
                woken
                or (self.machine.state is not State.IDLE and not self.record.hold)  # a hold rests
                or self._timer_due()
                or now - last_step >= idle_recheck_s
            ):
                try:
                    self.machine.run_until_stable()
                    failures = 0
                except Exception as exc:  # e.g. the state record cannot be saved (disk full)
                    # Never act without a saved state; keep serving what is loaded and retry
                    # with backoff instead of losing the thread that installs updates.
                    failures += 1
                    log_event(log, "lifecycle.step_failed", logging.ERROR,
                              error=f"{type(exc).__name__}: {exc}", failures=failures)
                    if stop.wait(min(poll_s * 2**failures, MAX_STEP_BACKOFF_S)):
                        return
                    continue
                last_step = now
            if on_tick is not None:
                on_tick()
            woken = self.ctx.wake.wait(poll_s)
            if woken:  # cleared only when seen: a set after a timed-out wait is kept
                self.ctx.wake.clear()
