"""Training jobs over the API: start (operator), list, show, logs (viewer), cancel and the
canary's approval (operator). Every change is audited by `fleet.training.jobs.TrainingJobs`.

The routes only record: the training worker of `fleet serve` (controller role) runs the job on
its next tick. A model without a training policy (`training.policies` in the settings,
docs/training.md) is refused (409), since nothing would know how to train it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleet.access.auth import Operator, Viewer
from fleet.api.deps import Paging, SettingsDep, StoreDep
from fleet.api.schemas import PageOf
from fleet.errors import Conflict, FleetInputError
from fleet.training.jobs import TrainingJob
from fleet.training.machine import JobState
from fleet.training.policy import TrainingPolicy

router = APIRouter(prefix="/v1/training", tags=["training"])
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"description": "No training policy for the model, or "
                                                    "the job is not in a state that allows this"}}
_Id = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: _Id
    parent_version: Annotated[str, StringConstraints(max_length=64)] = Field(
        description="the version the new one replaces (its bundle is the trainer's `parent.onnx`)")
    cohort: Annotated[str, StringConstraints(max_length=128)] = Field(
        default="", description="the drifted cohort: its collected data, and the canary's `{cohort}`")
    dataset_ids: Annotated[list[_Id], Field(max_length=1000)] = Field(
        default=[], description="train on these dataset versions (default: the policy's collected data)")


class JobNote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: Annotated[str, StringConstraints(max_length=1000)] = ""


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    model: str
    parent_version: str
    cohort: str
    trigger_alert_id: int | None
    dataset_ids: list[str]
    state: JobState
    step: str
    progress: float
    attempts: int
    cancel_requested: bool
    approval: str | None
    result_version: str | None
    rollout_id: str | None
    metrics: dict[str, Any]
    error: str
    history: list[dict[str, Any]]
    created_at: float
    updated_at: float
    created_by: str


class LogLine(BaseModel):
    seq: int
    at: float
    line: str


def _out(job: TrainingJob) -> JobOut:
    return JobOut.model_validate(job)


@router.post("/jobs", response_model=JobOut, status_code=201, responses=_CONFLICT,
             summary="Start a training job (the worker runs it)")
def start_job(body: JobCreate, store: StoreDep, settings: SettingsDep, who: Operator) -> JobOut:
    if settings.training.policy(body.model) is None:
        raise Conflict(f"model {body.model!r} has no training policy (training.policies in the settings)")
    store.models.get_version(body.model, body.parent_version)  # 404 for an unknown parent
    if len(set(body.dataset_ids)) != len(body.dataset_ids):
        raise FleetInputError("dataset_ids names a dataset version twice")
    return _out(store.training.create(body.model, body.parent_version, who.actor, cohort=body.cohort,
                                      dataset_ids=body.dataset_ids))


@router.get("/jobs", response_model=PageOf[JobOut], summary="List training jobs")
def list_jobs(_: Viewer, store: StoreDep, page: Paging, state: JobState | None = None,
              model: str | None = None) -> PageOf[JobOut]:
    p = store.training.page(page.cursor, page.limit, None if state is None else state.value, model)
    return PageOf[JobOut](items=[_out(j) for j in p.items], next_cursor=p.next_cursor)


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Read a training job")
def get_job(job_id: str, store: StoreDep, _: Viewer) -> JobOut:
    return _out(store.training.get(job_id))


@router.get("/jobs/{job_id}/logs", response_model=list[LogLine], summary="A job's log lines (trainer output)")
def job_logs(job_id: str, store: StoreDep, _: Viewer, after: Annotated[int, Query(ge=-1)] = -1,
             limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> list[LogLine]:
    return [LogLine(**r) for r in store.training.logs(job_id, after, limit)]


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, status_code=202, responses=_CONFLICT,
             summary="Cancel a job (its trainer is stopped; nothing is registered)")
def cancel_job(job_id: str, store: StoreDep, who: Operator) -> JobOut:
    return _out(store.training.request_cancel(job_id, who.actor))


@router.post("/jobs/{job_id}/approve", response_model=JobOut, status_code=202, responses=_CONFLICT,
             summary="Approve the canary of a job awaiting approval")
def approve_job(job_id: str, body: JobNote, store: StoreDep, who: Operator) -> JobOut:
    return _out(store.training.decide_approval(job_id, True, who.actor, body.note))


@router.post("/jobs/{job_id}/reject", response_model=JobOut, status_code=202, responses=_CONFLICT,
             summary="Reject the canary of a job awaiting approval (the version stays registered)")
def reject_job(job_id: str, body: JobNote, store: StoreDep, who: Operator) -> JobOut:
    return _out(store.training.decide_approval(job_id, False, who.actor, body.note))


@router.get("/policies", response_model=list[TrainingPolicy], summary="The configured training policies")
def list_policies(settings: SettingsDep, _: Viewer) -> list[TrainingPolicy]:
    """The policies as configured, with the trainer's environment values hidden (`***`: they may
    carry credentials the trainer needs)."""
    def hidden(p: TrainingPolicy) -> TrainingPolicy:
        return p.model_copy(update={"trainer": p.trainer.model_copy(
            update={"env": dict.fromkeys(p.trainer.env, "***")})})

    return [hidden(p) for p in settings.training.policies]
