"""Delta builds off the rollout controller's tick: one worker thread, answers the tick never waits on.

Why: building a delta of a 7 MB bundle in both formats (and checking each rebuilds the new
bundle) took 4-35 s. Inside the controller's first assigning tick that stalled every other
rollout and the leader's own lease renewal. Now the controller asks `for_devices`: when every
base it wants is already built (or known not worth it) the answer is immediate; otherwise the
missing bases are built on the worker and the answer is `None`, meaning "assign nothing to this
rollout yet, ask again next tick". After `max_wait_s` the answer is what exists, so devices get
full bundles rather than wait forever for an optimisation.

The decision (`delta_answer`) is pure over the job's state and a clock; the thread is the edge.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from agent.contract.director import DeltaRef, TargetRef
from agent.logs import log_event
from fleet.registry.deltas import DeltaCatalog

logger = logging.getLogger("edgefleet.fleet.deltas")

#: Longest a rollout waits for its deltas before devices fetch full bundles.
DEFAULT_MAX_WAIT_S = 300.0


@dataclass(frozen=True)
class BuildJob:
    """Deltas to one full target being built from `bases`, started at `started` (monotonic s)."""

    future: Future[dict[str, DeltaRef]]
    bases: tuple[str, ...]
    started: float


def delta_answer(missing: list[TargetRef], job: BuildJob | None, now: float, max_wait_s: float) -> str:
    """What to do for one `for_devices` call: "published" (answer with what exists), "wait"
    (a build is under way and within its time), "build" (start one for `missing`)."""
    if job is not None and not job.future.done():  # first: a base under way counts as tried
        return "wait" if now - job.started < max_wait_s else "published"
    if not missing:
        return "published"
    if job is not None and set(job.bases) >= {f"{m.name}-{m.version}" for m in missing}:
        return "published"  # it ran for these bases: what it could not build stays missing
    return "build"


class DeltaBuilds:
    """The controller's `DeltaSource`: `DeltaCatalog` behind a worker thread. A component
    (`start`/`stop`), owned by the composition root."""

    name = "delta-builds"

    def __init__(self, catalog: DeltaCatalog, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog = catalog
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._jobs: dict[tuple[str, str], BuildJob] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delta-build")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def for_devices(self, full: TargetRef, index: dict[str, TargetRef],
                    active_bundles: list[str | None]) -> dict[str, DeltaRef] | None:
        """Deltas to `full` for these devices' bundles, or None while they are being built."""
        if self.catalog.policy.bases == 0:
            return {}
        missing = self.catalog.missing(full, index, active_bundles)
        key = (full.path, full.sha256)
        with self._lock:
            job = self._jobs.get(key)
            answer = delta_answer(missing, job, self.clock(), self.max_wait_s)
            if answer == "build" and self._pool is not None:
                bases = tuple(f"{m.name}-{m.version}" for m in missing)
                self._jobs[key] = BuildJob(self._pool.submit(self._build, full, missing), bases, self.clock())
                log_event(logger, "delta.build_started", target=full.path, bases=list(bases))
                return None
            if answer == "wait":
                return None
        if answer == "build":  # not started (or stopped): build inline, as a plain catalog would
            return self.catalog.ensure(full, missing)
        if job is not None and not job.future.done():
            log_event(logger, "delta.build_too_slow", logging.WARNING, target=full.path,
                      waited_s=round(self.clock() - job.started, 1))
        return self.catalog.published(full.path)

    def _build(self, full: TargetRef, bases: list[TargetRef]) -> dict[str, DeltaRef]:
        try:
            return self.catalog.ensure(full, bases)
        except Exception as exc:  # the worker's edge: an optimisation never kills the thread
            log_event(logger, "delta.build_failed", logging.WARNING, target=full.path, error=str(exc))
            raise
