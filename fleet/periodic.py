"""`PeriodicRunner`: the one loop behind the fleet service's background jobs.

Why one: every background job of `fleet serve` (timestamp refresh, telemetry flush, drift
evaluation, the rollout controller's and the experiment driver's ticks) needs the same loop:
call something every N seconds on a daemon thread, sooner when woken, survive (log) its
exceptions, stop at once when asked and join. Written by hand in each component, each copy
differed a little; here it is written once and tested once (tests/fleet/test_periodic.py).

A job is a named callable with an interval. Each job runs on its own daemon thread, named
after the job, so a slow job (a drift evaluation) never delays another (a timestamp refresh).
Options cover the rollout controller's pacing: `run_at_start` (the first run at once instead of
after one interval), `wake` (an event that cuts the wait short, e.g. set by a device report)
and `min_gap_s` / `gap_covers_run_time` (wake-ups are coalesced: after a run, at least that
long passes before the next one, and at least as long as the run took, so a job woken by a
flood of reports spends at most half its time running).

Errors: `add` raises `FleetMisuseError` (duplicate name, bad interval, job added while the
runner runs); a job's own exceptions are logged with the traceback, counted in `failures`,
handed to its `on_error`, and never end the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleet.errors import FleetMisuseError

_log = logging.getLogger("edgefleet.fleet.periodic")


@dataclass
class PeriodicJob:
    """One named job of a `PeriodicRunner` (its settings and its counters)."""

    name: str
    fn: Callable[[], object]
    interval_s: float
    run_at_start: bool = False
    min_gap_s: float = 0.0
    gap_covers_run_time: bool = False
    on_error: Callable[[Exception], None] | None = None
    join_timeout_s: float = 10.0
    wake: threading.Event = field(default_factory=threading.Event)
    runs: int = 0  # finished runs, failed ones included
    failures: int = 0
    thread: threading.Thread | None = None


class PeriodicRunner:
    """Runs named callables periodically, each on its own daemon thread (module docstring).

    `add` jobs, then `start()`; `wake(name)` runs a job early; `stop()` ends every loop (a
    job mid-run finishes that run) and joins the threads. A stopped runner can be started
    again; `start()` forgets wake-ups that arrived while it was stopped.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or _log
        self.jobs: dict[str, PeriodicJob] = {}
        self._stop = threading.Event()
        self._running = False

    def add(self, name: str, fn: Callable[[], object], interval_s: float, *, run_at_start: bool = False,
            min_gap_s: float = 0.0, gap_covers_run_time: bool = False,
            on_error: Callable[[Exception], None] | None = None, wake: threading.Event | None = None,
            join_timeout_s: float = 10.0) -> PeriodicJob:
        """Register `fn` to run every `interval_s` seconds under `name` (also its thread's name).

        `wake`: an event of the caller's that cuts the current wait short when set (the
        runner makes one when not given; `wake(name)` sets it). Raises `FleetMisuseError`.
        """
        if name in self.jobs:
            raise FleetMisuseError(f"periodic job {name!r} already exists")
        if not interval_s > 0 or min_gap_s < 0:
            raise FleetMisuseError(f"periodic job {name!r}: interval must be > 0 and min_gap_s >= 0")
        if self._running:
            raise FleetMisuseError(f"periodic job {name!r}: add jobs before start()")
        job = PeriodicJob(name, fn, interval_s, run_at_start, min_gap_s, gap_covers_run_time, on_error,
                          join_timeout_s, wake if wake is not None else threading.Event())
        self.jobs[name] = job
        return job

    def wake(self, name: str) -> None:
        """Run job `name` as soon as its gap allows instead of after its interval (any thread)."""
        self.jobs[name].wake.set()

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        """Start one daemon thread per job (idempotent while running)."""
        if self._running:
            return
        self._stop.clear()
        for job in self.jobs.values():
            job.wake.clear()
            job.thread = threading.Thread(target=self._loop, args=(job,), name=job.name, daemon=True)
            job.thread.start()
        self._running = True

    def stop(self) -> None:
        """End every loop and join its thread (each for at most its `join_timeout_s`)."""
        self._stop.set()
        for job in self.jobs.values():
            job.wake.set()
        for job in self.jobs.values():
            if job.thread is not None:
                job.thread.join(timeout=job.join_timeout_s)
                job.thread = None
        self._running = False

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self, job: PeriodicJob) -> None:
        if not job.run_at_start and self._wait(job, 0.0):
            return
        while not self._stop.is_set():
            started = time.monotonic()
            self._run(job)
            if self._wait(job, time.monotonic() - started):
                return

    def _run(self, job: PeriodicJob) -> None:
        try:
            job.fn()
        except Exception as exc:  # a failed run is logged and counted; the next one retries
            job.failures += 1
            self.log.exception("periodic job %s failed", job.name)
            if job.on_error is not None:
                try:
                    job.on_error(exc)
                except Exception:  # the hook must not end the loop either
                    self.log.exception("error hook of periodic job %s failed", job.name)
        finally:
            job.runs += 1

    def _wait(self, job: PeriodicJob, elapsed: float) -> bool:
        """Wait until the job's next run; True when the runner is stopping instead."""
        gap = min(job.min_gap_s, job.interval_s)
        if job.gap_covers_run_time:
            gap = max(gap, elapsed)
        if gap > 0 and self._stop.wait(gap):
            return True
        job.wake.wait(max(0.0, job.interval_s - gap))
        job.wake.clear()
        return self._stop.is_set()
