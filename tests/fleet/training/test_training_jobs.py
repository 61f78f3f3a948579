"""Training jobs end to end in one process: a trigger starts a job, the sim trainer fits the
collected rows, the gate passes, the version is registered with its lineage and the canary is
created; every bad path (trainer fails, times out, writes garbage, the gate refuses, the fleet
restarts mid-step) leaves no version and no rollout."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.contract.collect import CollectPolicy
from agent.telemetry.collect import ChunkUploader, SampleCollector
from fleet.collection.records import CollectionStore
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.registry.datasets import DatasetStore
from fleet.registry.publish import publish_bundle
from fleet.store import Store
from fleet.telemetry.alert_records import Alert
from fleet.telemetry.alerts import AlertManager
from fleet.training.jobs import TrainingJobs
from fleet.training.machine import JobEvent, JobState
from fleet.training.policy import TrainingPolicy, TrainingSettings
from fleet.training.worker import TrainingWorker
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from simulators.models import make_mlp_onnx
from simulators.trainer import oracle_labels
from tests.support.fakes import FakeClock

COLLECT = CollectPolicy(policy_id="drift-b", max_rows=400, chunk_bytes=64 * 1024)


@dataclass
class World:
    root: Path
    store: Store
    repo: Repository
    datasets: DatasetStore
    clock: FakeClock

    def worker(self, **policy: object) -> TrainingWorker:
        base: dict[str, object] = {
            "model": "mlp", "reference_data": "reference.npz", "collect_policy_id": "drift-b",
            "labeler": "simulators.trainer:oracle_labels", "min_rows": 100, "rollout": "automatic",
            "trainer": {"entry_point": "simulators.trainer:train", "timeout_s": 120},
        }
        base.update(policy)
        settings = TrainingSettings(policies=(TrainingPolicy.model_validate(base),))
        return TrainingWorker(self.store, self.repo, self.store.training, settings, self.root,
                              datasets=self.datasets, clock=self.clock,
                              collections=CollectionStore(self.datasets.database, self.clock))

    def versions(self) -> list[str]:
        return [v.version for v in self.store.models.list_versions("mlp", None, 100).items]

    def rollouts(self) -> int:
        return len(self.store.rollouts.list(None, 100).items)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setenv("EDGEFLEET_SIM_TRAIN_STEPS", "80")
    root = Path(__file__).resolve().parents[3]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    clock = FakeClock()
    store = Store(tmp_path / "fleet.db", clock=clock)
    repo = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"))
    repo.init(root_threshold=1, root_keys=1)
    rng = np.random.default_rng(0)
    rx = rng.normal(size=(600, 32)).astype(np.float32)
    np.savez(tmp_path / "reference.npz", x=rx, y=oracle_labels(rx))
    (tmp_path / "parent.onnx").write_bytes(make_mlp_onnx(seed=0))
    bundle = build_bundle(tmp_path / "parent.onnx", BundleMetadata(name="mlp", version="1.0.0"),
                          tmp_path / "mlp-1.0.0.efb", reference_data=rx)
    publish_bundle(store, repo, bundle, "mlp", "test")
    for dev, cohort in (("dev-b1", "b"), ("dev-a1", "a")):
        store.devices.create(dev, {"cohort": cohort}, {}, dev, "$7$unused", "test")
    datasets = DatasetStore(tmp_path / "telemetry.db", clock=clock)
    for dev in ("dev-b1", "dev-a1"):  # the other cohort's sample is not trained on
        c = SampleCollector(COLLECT, 32, dev, clock)
        c.offer(rng.normal(loc=1.5, size=(1000, 32)))
        for _, payload in ChunkUploader(tmp_path / f"up-{dev}", COLLECT, dev, c.archive()).pending():
            datasets.ingest_chunk(dev, payload)
    yield World(tmp_path, store, repo, datasets, clock)
    datasets.close()
    store.close()


def _start(w: World) -> str:
    return w.store.training.create("mlp", "1.0.0", "operator", cohort="b").id


@pytest.mark.integration
def test_a_job_trains_gates_registers_with_lineage_and_starts_the_canary(world: World) -> None:
    worker = world.worker()
    jid = _start(world)
    worker.run_once()
    job = world.store.training.get(jid)
    assert job.state is JobState.SUCCEEDED, (job.error, job.history)
    assert job.result_version == "1.0.1" and job.rollout_id is not None
    assert len(job.dataset_ids) == 1 and "dev-b1" in job.dataset_ids[0]  # cohort b's sample only
    assert job.metrics["gate_new_collected"] > job.metrics["gate_parent_collected"]
    v = world.store.models.get_version("mlp", "1.0.1")
    src = v.lineage["source"]
    assert (src["training_job"], src["parent_version"]) == (jid, "mlp:1.0.0")
    assert src["dataset_ids"] == job.dataset_ids
    ro = world.store.rollouts.get(job.rollout_id)
    assert (ro.model_version_id, ro.selector) == ("mlp:1.0.1", "cohort=b")
    lines = [r["line"] for r in world.store.training.logs(jid)]
    assert any(ln.startswith("progress:") for ln in lines)
    acts = [a for a in _audit(world.store) if a.startswith("training_job")]
    assert "training_job.create" in acts and "training_job.state" in acts


def _audit(store: Store) -> list[str]:
    with store.read() as db:
        return [r["action"] for r in db.query("SELECT action FROM audit_log ORDER BY id")]


@pytest.mark.integration
def test_approval_policy_waits_for_the_operator(world: World) -> None:
    worker = world.worker(rollout="approval")
    jid = _start(world)
    worker.run_once()
    assert world.store.training.get(jid).state is JobState.AWAITING_APPROVAL
    assert world.versions() == ["1.0.0", "1.0.1"] and world.rollouts() == 0
    world.store.training.decide_approval(jid, True, "alice")
    worker.run_once()
    job = world.store.training.get(jid)
    assert job.state is JobState.SUCCEEDED and world.rollouts() == 1


def _fails_cleanly(w: World, worker: TrainingWorker, jid: str, why: str) -> None:
    worker.run_once()
    job = w.store.training.get(jid)
    assert job.state is JobState.FAILED and why in job.error, job.error
    assert w.versions() == ["1.0.0"] and w.rollouts() == 0


@pytest.mark.integration
@pytest.mark.parametrize(("trainer", "why"), [
    ({"command": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]}, "status 3"),
    ({"command": [sys.executable, "-c", "import time; time.sleep(30)"], "timeout_s": 1}, "timed out"),
    ({"command": [sys.executable, "-c", "import pathlib,sys; o=pathlib.Path(sys.argv[1]); "
                  "(o/'model.onnx').write_bytes(b'garbage'); (o/'metrics.json').write_text('{}')", "{out}"]},
     "ONNX"),
    ({"command": [sys.executable, "-c", "import pathlib,sys; o=pathlib.Path(sys.argv[1]); "
                  "(o/'model.onnx').write_bytes(b'x'); (o/'metrics.json').write_text('[1]')", "{out}"]},
     "metrics.json"),
    ({"command": [sys.executable, "-c", "pass"]}, "wrote no model.onnx"),
    ({"entry_point": "no_such_module:train"}, "status 2"),
])
def test_a_failing_trainer_changes_nothing(world: World, trainer: dict[str, object], why: str) -> None:
    worker = world.worker(trainer=trainer)
    _fails_cleanly(world, worker, _start(world), why)


@pytest.mark.integration
def test_a_gate_failure_changes_nothing(world: World) -> None:
    worker = world.worker(gate={"min_accuracy": 0.999})
    jid = _start(world)
    _fails_cleanly(world, worker, jid, "accuracy gate")
    assert "gate_new_accuracy" in world.store.training.get(jid).metrics  # the figures are kept


@pytest.mark.integration
def test_too_little_data_times_out(world: World) -> None:
    worker = world.worker(min_rows=10_000, data_timeout_s=60)
    jid = _start(world)
    worker.run_once()
    assert world.store.training.get(jid).state is JobState.WAITING_DATA
    world.clock.advance(61)
    _fails_cleanly(world, worker, jid, "not enough collected data")


@pytest.mark.integration
def test_a_job_interrupted_mid_training_is_resumed_then_given_up(world: World) -> None:
    jobs: TrainingJobs = world.store.training
    jid = _start(world)
    # a previous fleet process got as far as training and died in the trainer
    jobs.apply(jid, (JobEvent.STARTED,))
    first = [v.dataset_id for v in world.datasets.versions("drift-b") if v.device_id == "dev-b1"]
    jobs.apply(jid, (JobEvent.DATA_READY,), extra={"dataset_ids": first})
    jobs.begin_attempt(jid, "w-dead", "training")
    worker = world.worker()  # the restarted fleet's
    worker.run_once()
    job = jobs.get(jid)
    assert job.state is JobState.SUCCEEDED, job.history
    assert any("interrupted by a restart" in h.get("note", "") for h in job.history)
    # one that killed its worker every time is failed, not retried for ever
    jid2 = _start(world)
    jobs.apply(jid2, (JobEvent.STARTED,))
    jobs.apply(jid2, (JobEvent.DATA_READY,), extra={"dataset_ids": job.dataset_ids})
    for n in range(3):
        jobs.begin_attempt(jid2, f"w-dead{n}", "training")
    world.worker().run_once()
    assert jobs.get(jid2).state is JobState.FAILED
    assert world.versions() == ["1.0.0", "1.0.1"]


@pytest.mark.integration
def test_a_trigger_starts_one_job_and_only_for_a_model_with_a_policy(world: World) -> None:
    alerts = AlertManager(world.root / "alerts.db", clock=world.clock)
    world.clock.advance(-86401)
    _fire(alerts, "mlp", "a")  # a day and a second old when the worker looks: too old to act on
    world.clock.advance(86401)
    _fire(alerts, "mlp", "b")
    _fire(alerts, "mlp", "b", "prediction")  # the same drift's other trigger: covered by the first job
    _fire(alerts, "other-model", "b")
    worker = world.worker(rollout="approval")
    worker.alerts = alerts
    worker.run_once()
    worker2 = world.worker(rollout="approval")  # a restarted fleet sees the same trigger
    worker2.alerts = alerts
    worker2.run_once()
    jobs = world.store.training.page(None, 10).items
    assert len(jobs) == 1 and jobs[0].trigger_alert_id is not None and jobs[0].cohort == "b"
    v = world.store.models.get_version("mlp", "1.0.1")
    assert v.lineage["source"]["trigger_alert_id"] == jobs[0].trigger_alert_id
    _fire(alerts, "mlp", "b", version="1.0.1")  # the retrained version, within the cooldown: no loop
    _fire(alerts, "mlp", "a")  # another cohort is not covered
    worker2.run_once()
    jobs = world.store.training.page(None, 10).items
    assert sorted(j.cohort for j in jobs) == ["a", "b"]
    alerts.close()


@pytest.mark.integration
def test_a_job_asks_its_cohort_for_a_sample_and_trains_on_what_comes_back(world: World) -> None:
    worker = world.worker(collect={"max_rows": 300, "max_seconds": 60}, collect_policy_id=None)
    jid = _start(world)
    worker.run_once()
    job = world.store.training.get(jid)
    assert job.state is JobState.WAITING_DATA  # the sample of drift-b is not this job's
    collections = CollectionStore(world.datasets.database, world.clock)
    (col,) = [c for c in collections.list() if c.created_by == f"training:{jid}"]
    assert (col.model, col.version, col.selector, col.policy.max_rows) == ("mlp", "1.0.0", "cohort=b", 300)
    worker.run_once()  # a second look starts no second collection
    assert len(collections.list()) == 1
    policy = CollectPolicy(policy_id=col.collection_id, max_rows=300)
    c = SampleCollector(policy, 32, "dev-b1", world.clock)
    c.offer(np.random.default_rng(5).normal(loc=1.5, size=(1000, 32)))
    for _, payload in ChunkUploader(world.root / "up-col", policy, "dev-b1", c.archive()).pending():
        world.datasets.ingest_chunk("dev-b1", payload)
    worker.run_once()
    job = world.store.training.get(jid)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.dataset_ids[0].startswith(col.collection_id)
    assert collections.get(col.collection_id).status == "stopped"  # enough data: the devices stop


def _fire(alerts: AlertManager, model: str, cohort: str, subject: str = "dataset",
          version: str = "1.0.0") -> None:
    """A persisted `retrain` trigger, as `AlertManager._advance` writes one."""
    a = Alert("retrain", model, version, cohort, subject, "drift_share", 0.5, 0.3, 0.0, 60.0, 3, ["dev-b1"],
              1, alerts._clock())
    with alerts.database.tx() as db:
        alerts._persist(db, a)



class _Crash(Exception):
    """The fleet dying at a chosen state change."""


@pytest.mark.integration
def test_a_fleet_that_dies_entering_publishing_publishes_once_after_the_restart(world: World) -> None:
    first = world.worker()

    def die(job: object) -> None:
        if getattr(job, "state", None) is JobState.PUBLISHING:
            raise _Crash

    first.on_event = die
    jid = _start(world)
    with pytest.raises(_Crash):
        first.run_once()
    assert world.store.training.get(jid).state is JobState.PUBLISHING and world.versions() == ["1.0.0"]
    world.worker().run_once()  # the restarted fleet
    job = world.store.training.get(jid)
    assert job.state is JobState.SUCCEEDED and world.rollouts() == 1
    assert world.versions() == ["1.0.0", "1.0.1"]


@pytest.mark.integration
def test_a_version_someone_else_registered_meanwhile_fails_the_job_and_is_left_alone(world: World) -> None:
    worker = world.worker()

    def race(job: object) -> None:
        if getattr(job, "state", None) is JobState.PUBLISHING:
            world.store.models.register_version("mlp", "1.0.1", "sha256:" + "0" * 64, "onnx", {}, "alice")

    worker.on_event = race
    jid = _start(world)
    worker.run_once()
    job = world.store.training.get(jid)
    assert job.state is JobState.FAILED and "not registered by job" in job.error
    v = world.store.models.get_version("mlp", "1.0.1")
    assert v.created_by == "alice" and v.bundle_target is None and world.rollouts() == 0


@pytest.mark.integration
def test_cancelling_a_running_trainer_stops_it_and_registers_nothing(world: World) -> None:
    slow = "import time; print('fitting', flush=True); time.sleep(60)"
    worker = world.worker(trainer={"command": [sys.executable, "-c", slow], "timeout_s": 120})
    jid = _start(world)

    def cancel_when_training(job: object) -> None:
        if getattr(job, "state", None) is JobState.TRAINING:
            threading.Timer(1.0, world.store.training.request_cancel, (jid, "alice")).start()

    worker.on_event = cancel_when_training
    worker.run_once()
    job = world.store.training.get(jid)
    assert job.state is JobState.CANCELLED and world.versions() == ["1.0.0"] and world.rollouts() == 0
    lines = [r["line"] for r in world.store.training.logs(jid)]
    assert "fitting" in lines and "state cancelled: cancelled by operator" in lines
