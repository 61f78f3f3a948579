"""`PeriodicRunner`: periodic runs on named threads, wake-ups, coalescing, errors, stop and restart."""

from __future__ import annotations

import logging
import threading

import pytest

from fleet.errors import FleetMisuseError
from fleet.periodic import PeriodicRunner

WAIT_S = 20.0  # generous bound for a 2-core machine shared with other test runs; never asserted


def _until(cond: threading.Event) -> bool:
    return cond.wait(WAIT_S)


@pytest.mark.unit
def test_jobs_run_periodically_on_threads_named_after_them() -> None:
    seen: dict[str, list[str]] = {"periodic-a": [], "periodic-b": []}
    done = {name: threading.Event() for name in seen}

    def job(name: str) -> None:
        seen[name].append(threading.current_thread().name)
        if len(seen[name]) >= 3:
            done[name].set()

    runner = PeriodicRunner()
    runner.add("periodic-a", lambda: job("periodic-a"), 0.01)
    runner.add("periodic-b", lambda: job("periodic-b"), 0.01)
    runner.start()
    try:
        assert _until(done["periodic-a"]) and _until(done["periodic-b"])
    finally:
        runner.stop()
    assert set(seen["periodic-a"]) == {"periodic-a"} and set(seen["periodic-b"]) == {"periodic-b"}
    assert not runner.running and runner.jobs["periodic-a"].thread is None
    assert not {t.name for t in threading.enumerate()} & set(seen)  # joined


@pytest.mark.unit
def test_wake_runs_a_job_before_its_interval_and_run_at_start_runs_at_once() -> None:
    ran = threading.Event()
    first = threading.Event()
    runner = PeriodicRunner()
    runner.add("slow", ran.set, 3600)
    runner.add("eager", first.set, 3600, run_at_start=True)
    runner.start()
    try:
        assert _until(first)
        assert not ran.is_set()
        runner.wake("slow")
        assert _until(ran)
    finally:
        runner.stop()
    assert runner.jobs["slow"].runs == 1 and runner.jobs["eager"].runs == 1


@pytest.mark.unit
def test_an_external_wake_event_drives_a_tick_method() -> None:
    """The rollout controller keeps its own `_wake` event (set by device reports): the runner
    waits on it, so `RolloutController.tick` / `ExperimentDriver.tick` can be jobs as they are."""

    class Ticker:
        def __init__(self) -> None:
            self.wake = threading.Event()
            self.ticks = 0
            self.second = threading.Event()

        def tick(self) -> None:
            self.ticks += 1
            if self.ticks == 2:
                self.second.set()

    ticker = Ticker()
    runner = PeriodicRunner()
    runner.add("rollout-controller", ticker.tick, 3600, run_at_start=True, min_gap_s=0.01,
               gap_covers_run_time=True, wake=ticker.wake, join_timeout_s=30)
    runner.start()
    try:
        ticker.wake.set()  # a device reported
        assert _until(ticker.second)
    finally:
        runner.stop()
    assert ticker.ticks == 2


@pytest.mark.unit
def test_wake_ups_during_the_gap_coalesce_into_one_run() -> None:
    runs: list[int] = []
    first, second = threading.Event(), threading.Event()

    def tick() -> None:
        runs.append(1)
        (first if len(runs) == 1 else second).set()

    runner = PeriodicRunner()
    runner.add("ctl", tick, 3600, run_at_start=True, min_gap_s=0.5)
    runner.start()
    try:
        assert _until(first)
        for _ in range(100):  # a flood of reports right after a tick
            runner.wake("ctl")
        assert _until(second)
    finally:
        runner.stop()  # stopping wakes the job, which must not run again
    assert len(runs) == 2


@pytest.mark.unit
def test_a_failing_run_is_logged_counted_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    errors: list[Exception] = []
    recovered = threading.Event()

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        recovered.set()

    runner = PeriodicRunner(logging.getLogger("test.periodic"))
    runner.add("flaky", flaky, 0.01, on_error=errors.append)
    with caplog.at_level(logging.ERROR, logger="test.periodic"):
        runner.start()
        try:
            assert _until(recovered)
        finally:
            runner.stop()
    assert runner.jobs["flaky"].failures == 1 and [str(e) for e in errors] == ["disk on fire"]
    assert "periodic job flaky failed" in caplog.text and "disk on fire" in caplog.text


@pytest.mark.unit
def test_a_stopped_runner_starts_again() -> None:
    ran = threading.Event()
    runner = PeriodicRunner()
    runner.add("job", ran.set, 0.01)
    runner.start()
    runner.start()  # idempotent while running
    assert _until(ran)
    runner.stop()
    ran.clear()
    runner.start()
    try:
        assert _until(ran)
    finally:
        runner.stop()


@pytest.mark.unit
def test_bad_jobs_are_refused() -> None:
    runner = PeriodicRunner()
    runner.add("job", lambda: None, 1.0)
    with pytest.raises(FleetMisuseError, match="already exists"):
        runner.add("job", lambda: None, 1.0)
    with pytest.raises(FleetMisuseError, match="interval"):
        runner.add("zero", lambda: None, 0.0)
    runner.start()
    try:
        with pytest.raises(FleetMisuseError, match="before start"):
            runner.add("late", lambda: None, 1.0)
    finally:
        runner.stop()
