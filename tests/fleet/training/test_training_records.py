"""Training job records on both backends: one job per trigger, intent, transitions, bounded logs."""

from __future__ import annotations

import pytest

from fleet.errors import Conflict, FleetMisuseError, NotFound
from fleet.store import Store
from fleet.training.machine import JobEvent, JobState
from tests.support.fakes import FakeClock
from tests.support.postgres import Backend

E = JobEvent


@pytest.mark.integration
def test_jobs_records_on_each_backend(backend: Backend) -> None:
    clock = FakeClock()
    store = Store(backend.location(), clock=clock)
    jobs = store.training
    a = jobs.create("mlp", "1.0.0", "retrain-trigger", cohort="eu", trigger_alert_id=7)
    with pytest.raises(Conflict):
        jobs.create("mlp", "1.0.0", "retrain-trigger", cohort="eu", trigger_alert_id=7)
    assert jobs.by_trigger(7) == a and jobs.by_trigger(8) is None
    assert jobs.covering("mlp", "1.0.0", "eu", clock() - 60) == a
    assert jobs.covering("mlp", "1.0.1", "eu", clock() + 1) is None  # another version, outside the cooldown
    assert jobs.covering("mlp", "1.0.0", "us", clock() - 60) is None
    b = jobs.apply(a.id, (E.STARTED,), extra={"dataset_ids": ["d1"]})
    assert (b.state, b.dataset_ids) == (JobState.WAITING_DATA, ["d1"])
    with pytest.raises(FleetMisuseError):
        jobs.apply(a.id, (E.PUBLISHED,))
    assert jobs.get(a.id).state is JobState.WAITING_DATA  # a refused transition wrote nothing
    jobs.log(a.id, [f"line {i}" for i in range(30)], cap=10)
    jobs.log(a.id, ["last"], cap=10)
    lines = jobs.logs(a.id)
    assert [r["line"] for r in lines] == [*(f"line {i}" for i in range(21, 30)), "last"]
    assert [r["line"] for r in jobs.logs(a.id, after=lines[-2]["seq"])] == ["last"]
    with pytest.raises(Conflict):
        jobs.decide_approval(a.id, True, "alice")  # not awaiting approval
    assert jobs.request_cancel(a.id, "alice").cancel_requested
    failed = jobs.apply(a.id, (E.DATA_TIMEOUT,), "no data")
    assert failed.state is JobState.FAILED and failed.error == "no data"
    assert jobs.covering("mlp", "1.0.0", "eu", clock() - 60) is None  # a failed job covers nothing
    with pytest.raises(Conflict):
        jobs.request_cancel(a.id, "alice")  # finished
    with pytest.raises(NotFound):
        jobs.get("tj-nope")
    assert [j.id for j in jobs.unfinished()] == []
    assert [j.id for j in jobs.page(None, 10, state="failed").items] == [a.id]
    store.close()
