"""The training worker: turns retraining triggers into jobs and drives every unfinished job.

A component of `fleet serve` (controller role, behind the leader lease: `active`). Each tick
(job `training-worker` of its `PeriodicRunner`):

1. every `retrain` alert not yet seen whose model has a training policy starts a job (the
   trigger's alert id is unique among jobs, so a restart or a second look starts no second job);
   the parent is the trigger's version, the canary's cohort the trigger's cohort;
2. each unfinished job, oldest first: `machine.decide` over its record, the events persisted,
   then the step's work (`fleet.training.steps`), whose outcome is persisted as the next
   events. A step runs to its end inside the tick (the trainer's subprocess has its timeout),
   so a job this worker finds in `training` or `building` that another worker (a previous
   process) began was interrupted: `decide` retries it or fails it.

A job whose model has no policy any more fails at its next step. Errors of a step end its job
`failed` with the reason (nothing registered, no rollout); errors of the tick itself (a locked
database) are logged by the runner and retried next tick.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import EdgefleetError
from agent.logs import log_event
from fleet.collection.records import CollectionStore
from fleet.db.session import Db
from fleet.errors import Conflict, FleetError, FleetInputError, GateFailed, NotFound
from fleet.periodic import PeriodicRunner
from fleet.registry.datasets import DatasetStore
from fleet.registry.publish import REPO_LOCK, target_path_for
from fleet.store import Store
from fleet.telemetry.alerts import AlertManager
from fleet.training import steps
from fleet.training.jobs import TrainingJob, TrainingJobs
from fleet.training.machine import JobEvent, JobSnapshot, JobState, Work, decide
from fleet.training.policy import TrainingPolicy, TrainingSettings
from fleet.training.runner import TrainingCancelled
from fleet.trust.repository import Repository

log = logging.getLogger("edgefleet.fleet.training")
E = JobEvent
LOG_FLUSH_LINES = 50


class TrainingWorker:
    """See the module docstring. `run_once()` is one tick (tests call it directly)."""

    name = "training-worker"

    def __init__(self, store: Store, repository: Repository, jobs: TrainingJobs, settings: TrainingSettings,
                 data_dir: Path, datasets: DatasetStore | None = None, alerts: AlertManager | None = None,
                 clock: Callable[[], float] = time.time, owns_datasets: bool = False,
                 collections: CollectionStore | None = None) -> None:
        self.store, self.repository, self.jobs = store, repository, jobs
        self.settings, self.data_dir, self.datasets, self.alerts = settings, Path(data_dir), datasets, alerts
        self.clock = clock
        self.collections = collections
        self._owns_datasets = owns_datasets
        self.token = "w-" + secrets.token_hex(6)  # this worker's attempts (a restart has another)
        self.active: Callable[[], bool] = lambda: True
        self.on_event: Callable[[TrainingJob], None] | None = None  # after each state change (tests, sim)
        self._seen_alert = 0
        self._tick_lock = threading.Lock()
        self._runner = PeriodicRunner(log)
        self._runner.add(self.name, self.run_once, settings.tick_s, run_at_start=True, join_timeout_s=30)

    # -- component -------------------------------------------------------------------------
    def start(self) -> None:
        self._runner.start()

    def stop(self) -> None:
        self._runner.stop()
        if self._owns_datasets and self.datasets is not None:
            self.datasets.close()

    def wake(self) -> None:
        self._runner.wake(self.name)

    # -- one tick ---------------------------------------------------------------------------
    def run_once(self) -> None:
        if not self.active():
            return
        with self._tick_lock:
            self._jobs_from_triggers()
            for job in self.jobs.unfinished():
                self.advance(job)

    def _jobs_from_triggers(self) -> None:
        if self.alerts is None:
            return
        for alert in self.alerts.alerts(kind="retrain"):
            if alert.id is None or alert.id <= self._seen_alert:
                continue
            self._seen_alert = alert.id
            policy = self.settings.policy(alert.model)
            if policy is None or self.clock() - alert.created_at > policy.max_trigger_age_s:
                continue
            if self.jobs.by_trigger(alert.id) is not None:
                continue
            since = self.clock() - policy.cooldown_s
            same = self.jobs.covering(alert.model, alert.version, alert.cohort, since)
            if same is not None:  # e.g. the prediction subject's trigger of the same drift
                log_event(log, "training.trigger_covered", trigger=alert.id, job=same.id,
                          state=same.state.value)
                continue
            try:
                job = self.jobs.create(alert.model, alert.version, "retrain-trigger", cohort=alert.cohort,
                                       trigger_alert_id=alert.id)
            except Conflict:  # another process took it
                continue
            log_event(log, "training.job_created", job=job.id, model=alert.model, trigger=alert.id)

    def _changed(self, job: TrainingJob) -> TrainingJob:
        log_event(log, "training.job_state", job=job.id, state=job.state.value, step=job.step)
        policy = self.settings.policy(job.model)
        note = job.history[-1].get("note", "") if job.history else ""
        self.jobs.log(job.id, [f"state {job.state.value}" + (f": {note}" if note else "")],
                      policy.trainer.max_log_lines if policy else 2000)
        if self.on_event is not None:
            self.on_event(job)
        return job

    def advance(self, job: TrainingJob) -> TrainingJob:
        """Drive one job as far as it goes in this tick; the job as persisted last."""
        for _ in range(8):  # each loop persists one decision; a job ends in a handful
            policy = self.settings.policy(job.model)
            if policy is None and not job.finished:
                return self._fail(job, "the model has no training policy")
            assert policy is not None or job.finished
            snap = JobSnapshot(job.state, job.created_at, job.attempts, job.cancel_requested, job.approval,
                               resumed=bool(job.worker) and job.worker != self.token)
            d = decide(snap, self.clock(), policy.data_timeout_s if policy else 0.0,
                       policy.max_attempts if policy else 1)
            if d.events:
                job = self._changed(self.jobs.apply(job.id, d.events, d.note, extra={"worker": self.token}
                                                     if d.work in (Work.TRAIN, Work.BUILD) else None))
            if d.work is Work.NOTHING or policy is None:
                return job
            before = job.state
            job = self._work(job, policy, d.work)
            if job.state is before:  # waiting (data, approval): next tick
                return job
        return job

    def _fail(self, job: TrainingJob, why: str) -> TrainingJob:
        event = {JobState.QUEUED: E.CANCEL_REQUESTED, JobState.WAITING_DATA: E.DATA_TIMEOUT,
                 JobState.TRAINING: E.TRAIN_FAILED, JobState.BUILDING: E.BUILD_FAILED,
                 JobState.PUBLISHING: E.PUBLISH_FAILED, JobState.AWAITING_APPROVAL: E.REJECTED}[job.state]
        return self._changed(self.jobs.apply(job.id, (event,), why, extra={"error": why[:2000]}))

    def _context(self, job: TrainingJob, policy: TrainingPolicy, buffer: list[str]) -> steps.StepContext:
        def line(text: str) -> None:
            buffer.append(text)
            if len(buffer) >= LOG_FLUSH_LINES:
                self.jobs.log(job.id, buffer[:], policy.trainer.max_log_lines)
                buffer.clear()

        def cancelled() -> bool:
            try:
                return self.jobs.get(job.id).cancel_requested
            except FleetError:
                return False

        return steps.StepContext(self.store, self.repository, self.datasets, self.collections, self.data_dir,
                                 line, lambda f, t: self.jobs.set_progress(job.id, f, t), cancelled)

    def _work(self, job: TrainingJob, policy: TrainingPolicy, work: Work) -> TrainingJob:
        buffer: list[str] = []
        ctx = self._context(job, policy, buffer)
        try:
            if work is Work.WAIT_DATA:
                steps.start_collection(ctx, job, policy)
                found = steps.collected(ctx, policy, job)
                if job.dataset_ids:  # the operator named them
                    found = [v for v in steps.all_versions(ctx) if v.dataset_id in set(job.dataset_ids)]
                    if len(found) != len(job.dataset_ids):
                        raise FleetInputError("some of the job's dataset_ids are not dataset versions")
                rows = sum(v.rows for v in found)
                if rows < policy.min_rows:
                    self.jobs.set_progress(job.id, 0.0, f"waiting for data: {rows}/{policy.min_rows} rows")
                    return job
                ids = [v.dataset_id for v in found]
                steps.stop_collection(ctx, job, policy)  # enough: the devices stop sampling
                return self._changed(self.jobs.apply(job.id, (E.DATA_READY,), f"{rows} rows in {len(ids)} "
                                                     "dataset versions", extra={"dataset_ids": ids}))
            if work is Work.TRAIN:
                job = self.jobs.begin_attempt(job.id, self.token, "training")
                metrics = steps.train(ctx, job, policy)
                return self._changed(self.jobs.apply(job.id, (E.TRAINED,), "trainer finished",
                                                     extra={"metrics": metrics}))
            if work is Work.BUILD:
                job = self.jobs.begin_attempt(job.id, self.token, "building")
                version = job.result_version or steps.next_version(self.store, job.model, job.parent_version)
                trained = {k: float(v) for k, v in job.metrics.items()}
                figures = steps.build(ctx, job, policy, version, trained)
                return self._changed(self.jobs.apply(job.id, (E.GATE_PASSED,), "accuracy gate passed",
                                                     extra={"metrics": {**job.metrics, **figures},
                                                            "result_version": version}))
            if work is Work.PUBLISH:
                return self._changed(self._publish(ctx, job, policy))
            if work is Work.ROLLOUT:
                return self._changed(self.jobs.apply(job.id, (E.APPROVED,), "canary approved",
                                                     with_tx=lambda db: self._rollout(ctx, job, policy)))
        except TrainingCancelled:
            return self._changed(self.jobs.apply(job.id, (E.CANCEL_REQUESTED,), "cancelled by operator"))
        except (EdgefleetError, OSError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, EdgefleetError) else str(exc)
            extra: dict[str, object] = {"error": why[:2000]}
            if isinstance(exc, GateFailed) and exc.figures:
                extra["metrics"] = {**job.metrics, **exc.figures}
            current = self.jobs.get(job.id)
            return self._fail_with(current, why, extra)
        finally:
            self.jobs.log(job.id, buffer, policy.trainer.max_log_lines)
        return job

    def _fail_with(self, job: TrainingJob, why: str, extra: dict[str, object]) -> TrainingJob:
        if job.finished:
            return job
        self.jobs.log(job.id, [f"failed: {why}"[:2000]], 10**6)
        event = {JobState.WAITING_DATA: E.DATA_TIMEOUT, JobState.TRAINING: E.TRAIN_FAILED,
                 JobState.BUILDING: E.BUILD_FAILED, JobState.PUBLISHING: E.PUBLISH_FAILED,
                 JobState.AWAITING_APPROVAL: E.REJECTED}.get(job.state, E.CANCEL_REQUESTED)
        out = self._changed(self.jobs.apply(job.id, (event,), why[:500], extra=extra))
        policy = self.settings.policy(job.model)
        if policy is not None:
            steps.stop_collection(self._context(job, policy, []), job, policy)
        if out.state is JobState.FAILED:
            shutil.rmtree(steps.job_dir(self.data_dir, job.id), ignore_errors=True)
        return out

    def _rollout(self, ctx: steps.StepContext, job: TrainingJob, policy: TrainingPolicy) -> dict[str, object]:
        rollout = steps.start_canary(ctx, job, policy, f"training:{job.id}")
        return {"rollout_id": rollout.id}

    def _publish(self, ctx: steps.StepContext, job: TrainingJob, policy: TrainingPolicy) -> TrainingJob:
        """Register (and, automatic, start the canary) in the transaction that ends publishing.

        A version this job registered before a restart cut the state write is found by its
        lineage and not registered again; a failure removes the TUF target it added."""
        assert job.result_version is not None
        existing = self._registered_by(job)
        automatic = policy.rollout == "automatic"
        event = E.PUBLISHED if automatic else E.PUBLISHED_AWAITING

        def register(db: Db) -> dict[str, object]:
            if existing is None:
                steps.publish(ctx, job, policy)
            return self._rollout(ctx, job, policy) if automatic else {}

        try:
            return self.jobs.apply(job.id, (event,), f"registered {job.model}:{job.result_version}",
                                   with_tx=register)
        except (EdgefleetError, OSError):
            if existing is None:
                self._unpublish(job)
            raise

    def _registered_by(self, job: TrainingJob) -> str | None:
        try:
            v = self.store.models.get_version(job.model, str(job.result_version))
        except NotFound:
            return None
        if v.lineage.get("source", {}).get("training_job") != job.id:
            raise Conflict(f"version {v.id} exists and was not registered by job {job.id}")
        return v.id

    def _unpublish(self, job: TrainingJob) -> None:
        try:
            with REPO_LOCK:
                self.repository.remove_target(target_path_for(job.model, str(job.result_version)))
        except FleetError:
            pass
