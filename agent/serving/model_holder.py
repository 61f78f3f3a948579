"""The serving model holder: hot swap without failed requests, and shadow mode.

Why a reference swap: the new model is loaded and warmed *beside* the old one, then a
single reference is replaced under a lock. A request picks its model under the lock and
runs outside it, so requests in flight finish on the model they started on; the retired
model is closed only after its in-flight count drains. During probation the old model is
kept warm as `standby`, so a rollback is one more reference swap (no load on that path).

Shadow mode runs a candidate on a copy of every request *off the caller's path*: a
bounded queue feeds one worker thread; when the queue is full the copy is dropped and
counted, so a slow candidate can never slow down serving. Shadow outputs are never served.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from agent.errors import InputValidationError, NoModelLoadedError
from agent.logs import log_event

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
_T = TypeVar("_T")


class LoadedModel(Protocol):
    """What `agent.runtimes.load_model` returns."""

    def predict(self, inputs: Tensors) -> Tensors: ...

    def close(self) -> None: ...


#: Called after every served request: (bundle_id, latency_seconds, ok).
Observer = Callable[[str, float, bool], None]
#: Called for every request the serving model refused as invalid input: (bundle_id,).
RejectObserver = Callable[[str], None]


@dataclass
class _Serving:
    model: LoadedModel
    bundle_id: str
    inflight: int = 0
    started: dict[int, float] = field(default_factory=dict)  # request token -> start time


@dataclass(frozen=True)
class ShadowReport:
    """How a shadow candidate compares with the served model so far."""

    bundle_id: str | None
    offered: int
    compared: int
    dropped: int
    errors: int
    label_agreement: float | None
    mean_abs_diff: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None


class _Shadow:
    def __init__(self, model: LoadedModel, bundle_id: str, queue_size: int) -> None:
        self.model = model
        self.bundle_id = bundle_id
        self.queue: queue.Queue[tuple[Tensors, Tensors] | None] = queue.Queue(maxsize=queue_size)
        self.lock = threading.Lock()
        self.offered = self.compared = self.dropped = self.errors = 0
        self.agree = 0
        self.labels = 0
        self.abs_diff_sum = 0.0
        self.abs_diff_n = 0
        self.latencies: deque[float] = deque(maxlen=10_000)
        self.thread = threading.Thread(target=self._work, name=f"shadow-{bundle_id}", daemon=True)
        self.thread.start()

    def offer(self, inputs: Tensors, served: Tensors) -> None:
        with self.lock:
            self.offered += 1
        # Copies: the Unix server's inputs are views of a receive buffer reused by the next request.
        inputs = {k: np.array(v) for k, v in inputs.items()}
        try:
            self.queue.put_nowait((inputs, served))
        except queue.Full:
            with self.lock:
                self.dropped += 1

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            inputs, served = item
            t0 = time.perf_counter()
            try:
                out = self.model.predict(inputs)
            except Exception:
                with self.lock:
                    self.errors += 1
                continue
            elapsed = time.perf_counter() - t0
            self._compare(served, out, elapsed)

    def _compare(self, served: Tensors, out: Tensors, elapsed: float) -> None:
        with self.lock:
            self.latencies.append(elapsed)
            self.compared += 1
            for name, ref in served.items():
                cand = out.get(name)
                if cand is None or cand.shape != ref.shape:
                    continue
                a = np.asarray(ref, dtype=np.float64)
                b = np.asarray(cand, dtype=np.float64)
                self.abs_diff_sum += float(np.abs(a - b).sum())
                self.abs_diff_n += a.size
                if a.ndim >= 1 and a.shape[-1] > 1:
                    la, lb = a.argmax(axis=-1), b.argmax(axis=-1)
                    self.agree += int((la == lb).sum())
                    self.labels += la.size

    def report(self) -> ShadowReport:
        with self.lock:
            lat = np.array(self.latencies) * 1000.0 if self.latencies else None
            return ShadowReport(
                bundle_id=self.bundle_id,
                offered=self.offered,
                compared=self.compared,
                dropped=self.dropped,
                errors=self.errors,
                label_agreement=self.agree / self.labels if self.labels else None,
                mean_abs_diff=self.abs_diff_sum / self.abs_diff_n if self.abs_diff_n else None,
                latency_p50_ms=float(np.percentile(lat, 50)) if lat is not None else None,
                latency_p95_ms=float(np.percentile(lat, 95)) if lat is not None else None,
            )

    def stop(self, timeout_s: float) -> None:
        # drain what is queued, then stop the worker; never block serving
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)
        self.thread.join(timeout_s)
        if not self.thread.is_alive():
            self.model.close()
        else:
            log_event(log, "serving.shadow_hung", logging.WARNING, bundle=self.bundle_id)


class ModelHolder:
    """Holds the serving model (and a warm standby during probation); thread-safe."""

    def __init__(self, drain_timeout_s: float = 5.0, shadow_queue_size: int = 256) -> None:
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._current: _Serving | None = None
        self._standby: _Serving | None = None
        self._shadow: _Shadow | None = None
        # Tuples, replaced (not mutated) under the lock: a request takes them without a copy.
        self._observers: tuple[Observer, ...] = ()
        self._reject_observers: tuple[RejectObserver, ...] = ()
        self._retiring = 0  # threads in `_retire` waiting for a model to drain
        self._token = 0
        self.drain_timeout_s = drain_timeout_s
        self.last_swap_at = 0.0  # perf_counter() of the last reference swap (for rollback_ms)
        self.shadow_queue_size = shadow_queue_size

    # -- serving ---------------------------------------------------------------------------
    def predict(self, inputs: Tensors) -> Tensors:
        """Run the serving model.

        Raises `NoModelLoadedError` if no model is served; whatever the runtime raises
        propagates (`InputValidationError` is the caller's fault and is not counted as a
        model error by observers; anything else is). Reject observers see the
        `InputValidationError`s: right after a swap they are what the clients see of the new
        model (probation counts them against it).
        """
        return self.predict_tagged(inputs)[1]

    def predict_tagged(self, inputs: Tensors) -> tuple[str, Tensors]:
        """Like `predict`, plus the bundle id that actually served this request (for telemetry)."""
        with self._lock:
            cur = self._current
            if cur is None:
                raise NoModelLoadedError("no model is being served")
            self._token += 1
            token = self._token
            t0 = time.monotonic()
            cur.inflight += 1
            cur.started[token] = t0
            shadow = self._shadow
        ok: bool | None = False
        try:
            out = cur.model.predict(inputs)
            ok = True
        except InputValidationError:
            ok = None  # a bad request says nothing about the model's health (see above)
            raise
        finally:
            latency = time.monotonic() - t0
            with self._lock:
                cur.inflight -= 1
                cur.started.pop(token, None)
                if cur.inflight == 0 and self._retiring:  # nobody waits in the common case
                    self._drained.notify_all()
                observers, rejecters = self._observers, self._reject_observers
            if ok is not None:
                for obs in observers:
                    obs(cur.bundle_id, latency, ok)
            else:
                for rej in rejecters:
                    rej(cur.bundle_id)
        if shadow is not None:
            shadow.offer(inputs, out)
        return cur.bundle_id, out

    @property
    def bundle_id(self) -> str | None:
        with self._lock:
            return self._current.bundle_id if self._current else None

    @property
    def standby_id(self) -> str | None:
        with self._lock:
            return self._standby.bundle_id if self._standby else None

    def oldest_inflight_s(self) -> float:
        """Age of the oldest request still running on the serving model (hang detection)."""
        with self._lock:
            if self._current is None or not self._current.started:
                return 0.0
            return time.monotonic() - min(self._current.started.values())

    def add_observer(self, observer: Observer) -> None:
        with self._lock:
            self._observers = (*self._observers, observer)

    def remove_observer(self, observer: Observer) -> None:
        with self._lock:
            self._observers = _without(self._observers, observer)

    def add_reject_observer(self, observer: RejectObserver) -> None:
        with self._lock:
            self._reject_observers = (*self._reject_observers, observer)

    def remove_reject_observer(self, observer: RejectObserver) -> None:
        with self._lock:
            self._reject_observers = _without(self._reject_observers, observer)

    # -- swapping -------------------------------------------------------------------------
    def swap(self, model: LoadedModel, bundle_id: str, keep_previous: bool = True) -> None:
        """Serve `model` from now on (it must already be loaded and warmed).

        With `keep_previous` the old model stays warm as standby for `revert()`; otherwise
        it is closed once its in-flight requests finish.
        """
        with self._lock:
            old, self._current = self._current, _Serving(model, bundle_id)
            self.last_swap_at = time.perf_counter()
            retire = self._standby if keep_previous else old
            if keep_previous:
                self._standby = old
        standby = old.bundle_id if keep_previous and old else None
        log_event(log, "serving.swap", bundle=bundle_id, standby=standby)
        if retire is not None:
            self._retire(retire)

    def revert(self) -> bool:
        """Serve the standby again (rollback); the reverted model is closed after draining.

        Returns False if there is no standby (the caller must load the previous model).
        """
        with self._lock:
            if self._standby is None:
                return False
            bad, self._current, self._standby = self._current, self._standby, None
            self.last_swap_at = time.perf_counter()
        log_event(log, "serving.revert", bundle=self._current.bundle_id if self._current else None)
        if bad is not None:
            self._retire(bad)
        return True

    def drop_standby(self) -> None:
        """Commit: the standby is no longer needed."""
        with self._lock:
            old, self._standby = self._standby, None
        if old is not None:
            self._retire(old)

    def clear(self) -> None:
        """Stop serving anything (no verified model left); closes models after draining."""
        with self._lock:
            olds = [s for s in (self._current, self._standby) if s is not None]
            self._current = self._standby = None
        for old in olds:
            self._retire(old)

    def _retire(self, slot: _Serving) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        with self._lock:
            self._retiring += 1
            try:
                while slot.inflight > 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._drained.wait(left)
            finally:
                self._retiring -= 1
            drained = slot.inflight == 0
        if drained:
            slot.model.close()
        else:  # a hung request still uses it: leak rather than close under its feet
            log_event(log, "serving.retire_leaked", logging.WARNING, bundle=slot.bundle_id,
                      inflight=slot.inflight)

    # -- shadow ---------------------------------------------------------------------------
    def set_shadow(self, model: LoadedModel | None, bundle_id: str | None = None) -> None:
        """Run `model` in shadow on every request from now on (None stops shadow mode)."""
        new = _Shadow(model, bundle_id or "shadow", self.shadow_queue_size) if model is not None else None
        with self._lock:
            old, self._shadow = self._shadow, new
        if old is not None:
            old.stop(self.drain_timeout_s)

    @property
    def shadow_id(self) -> str | None:
        with self._lock:
            return self._shadow.bundle_id if self._shadow else None

    def shadow_report(self) -> ShadowReport:
        """Agreement, distance, latency and drop counts of the current shadow."""
        with self._lock:
            shadow = self._shadow
        if shadow is None:
            return ShadowReport(None, 0, 0, 0, 0, None, None, None, None)
        return shadow.report()

    def close(self) -> None:
        """Stop shadow mode and close every model."""
        self.set_shadow(None)
        self.clear()


def _without(items: tuple[_T, ...], item: _T) -> tuple[_T, ...]:
    """`items` less the first `item` (unchanged when it is not there)."""
    if item not in items:
        return items
    i = items.index(item)
    return items[:i] + items[i + 1:]
