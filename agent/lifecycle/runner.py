"""`Lifecycle`: the one object the daemon holds (state store + slots + machine + handlers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from agent.lifecycle.install import (
    HANDLERS,
    EventSink,
    ExtractFn,
    LifecycleConfig,
    LifecycleContext,
    ModelLoader,
    TrustSource,
    _default_extract,
    _default_loader,
)
from agent.lifecycle.machine import LoopLimits, Machine, State
from agent.lifecycle.slots import Slots
from agent.lifecycle.state_store import DesiredTarget, StateRecord, StateStore
from agent.serving import ModelHolder


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
        load: ModelLoader = _default_loader,
        extract: ExtractFn = _default_extract,
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

    def run_forever(
        self, stop: threading.Event, poll_s: float = 1.0, on_tick: Callable[[], None] | None = None
    ) -> None:
        """Settle, then wait for a new target (or `poll_s`), until `stop` is set."""
        while not stop.is_set():
            self.machine.run_until_stable()
            if on_tick is not None:
                on_tick()
            self.ctx.wake.wait(poll_s)
            self.ctx.wake.clear()
