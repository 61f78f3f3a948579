"""A/B experiment routes: create (starts assigning arms), read, observations, recommendation, stop.

The experiment driver (a fleet component) sends each matching device the director document
of its arm; these routes record and read. The recommendation reads pushed observations and,
when the fleet keeps telemetry (`<data_dir>/telemetry.db`), each version's merged windows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleet.access.auth import Operator, Viewer
from fleet.api.deps import Paging, SettingsDep, StoreDep, idempotent_create
from fleet.api.schemas import PageOf
from fleet.db.rows import Row
from fleet.rollouts.experiments import DEFAULT_METRICS, ExperimentRepo
from fleet.telemetry.ingest import TelemetryStore

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])
MetricName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]


class ExperimentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    version_a: Annotated[str, StringConstraints(min_length=3, max_length=200)] = Field(
        description="Control, `<model>:<version>`")
    version_b: Annotated[str, StringConstraints(min_length=3, max_length=200)] = Field(
        description="Candidate, `<model>:<version>`")
    selector: Annotated[str, StringConstraints(max_length=1024)] = ""
    split_b: float = Field(default=0.5, gt=0, lt=1, description="Share of the cohort that runs B")
    metrics: Annotated[dict[MetricName, Literal["min", "max"]], Field(min_length=1, max_length=20)] = \
        Field(default_factory=lambda: dict(DEFAULT_METRICS))
    min_samples: int = Field(default=100, ge=1, le=10**9)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)


class ExperimentOut(BaseModel):
    id: str
    name: str
    model_name: str
    version_a: str
    version_b: str
    selector: str
    split_b: float
    metrics: dict[str, str]
    min_samples: int
    alpha: float
    state: str
    created_at: str
    created_by: str
    devices: dict[str, int] = Field(default_factory=dict, description="Devices assigned per arm")


class Observations(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arm: Literal["a", "b"]
    metric: MetricName
    values: Annotated[list[float], Field(min_length=1, max_length=100_000)]


class MetricVerdictOut(BaseModel):
    metric: str
    goal: str
    test: str
    n_a: int
    n_b: int
    value_a: float | None
    value_b: float | None
    p_value: float | None
    effect_size: float | None
    winner: str | None
    more_samples_needed: int
    p95_a: float | None = None
    p95_b: float | None = None


class RecommendationOut(BaseModel):
    verdict: Literal["a", "b", "conflicting", "inconclusive"]
    summary: str
    metrics: list[MetricVerdictOut]


def _out(repo: ExperimentRepo, row: Row) -> Row:
    arms = list(repo.devices(row["id"]).values())
    return {**row, "devices": {"a": arms.count("a"), "b": arms.count("b")}}


@router.get("", response_model=PageOf[ExperimentOut], summary="List experiments")
def list_experiments(_: Viewer, store: StoreDep, page: Paging) -> PageOf[Row]:
    repo = ExperimentRepo(store)
    p = repo.list(page.cursor, page.limit)
    return PageOf[Row](items=[_out(repo, r) for r in p.items], next_cursor=p.next_cursor)


@router.post("", response_model=ExperimentOut, status_code=201,
             responses={409: {"description": "Versions unusable or idempotency key reused"}},
             summary="Create and start an A/B experiment")
def create_experiment(body: ExperimentCreate, request: Request, store: StoreDep,
                      who: Operator) -> JSONResponse:
    repo = ExperimentRepo(store)
    return idempotent_create(request, who, body, ExperimentOut, lambda: _out(repo, repo.create(
        body.name, body.version_a, body.version_b, body.selector, body.split_b, dict(body.metrics),
        body.min_samples, body.alpha, who.actor)))


@router.get("/{experiment_id}", response_model=ExperimentOut, summary="Read an experiment")
def get_experiment(experiment_id: str, store: StoreDep, _: Viewer) -> Row:
    repo = ExperimentRepo(store)
    return _out(repo, repo.get(experiment_id))


@router.post("/{experiment_id}/observations", status_code=202, summary="Add metric samples for an arm")
def add_observations(experiment_id: str, body: Observations, store: StoreDep,
                     who: Operator) -> dict[str, Any]:
    n = ExperimentRepo(store).observe(experiment_id, body.arm, body.metric, body.values, who.actor)
    return {"accepted": n}


@router.get("/{experiment_id}/recommendation", response_model=RecommendationOut,
            summary="Compare the arms: winner, p-values, effect sizes, or how many more samples")
def recommendation(experiment_id: str, store: StoreDep, settings: SettingsDep, _: Viewer) -> dict[str, Any]:
    telemetry = None
    path = settings.data_dir / "telemetry.db"
    if path.exists():
        telemetry = TelemetryStore(path)
    try:
        return ExperimentRepo(store).recommendation(experiment_id, telemetry).to_dict()
    finally:
        if telemetry is not None:
            telemetry.close()


@router.post("/{experiment_id}/stop", response_model=ExperimentOut, summary="Stop assigning devices")
def stop_experiment(experiment_id: str, store: StoreDep, who: Operator) -> Row:
    repo = ExperimentRepo(store)
    return _out(repo, repo.stop(experiment_id, who.actor))
