"""A/B experiment routes: create (starts assigning arms), read, observations, recommendation, stop.

The experiment driver (a fleet component) sends each matching device the director document
of its arm; these routes record and read. The recommendation reads pushed observations and,
when the fleet keeps telemetry (`<data_dir>/telemetry.db`, or the PostgreSQL database), each
device's totals of its arm's version, and judges by device with always-valid tests
(docs/rollouts.md, "A/B statistics"): reading it is safe at any time, and it stores each
metric's running test state.
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
from fleet.rollouts.experiments import DEFAULT_METRICS, DEFAULT_MIN_DEVICES, ExperimentRepo
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
    min_samples: int = Field(default=100, ge=1, le=10**9, description="Requests or observations per arm "
                             "before a verdict")
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Family-wise level: each of k metrics "
                         "is tested at alpha / k (Bonferroni)")
    min_devices: int = Field(default=DEFAULT_MIN_DEVICES, ge=2, le=10**6,
                             description="Devices per arm before any verdict")
    taus: Annotated[dict[MetricName, Annotated[float, Field(gt=0, allow_inf_nan=False)]],
                    Field(max_length=20)] = Field(
        default_factory=dict, description="Effect of interest per metric (the sequential test's mixing "
        "scale); defaults: 0.01 for error_rate, 10 % of arm A's mean otherwise")


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
    min_devices: int = DEFAULT_MIN_DEVICES
    taus: dict[str, float] = Field(default_factory=dict)
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
    test: str = Field(description="The test and its unit, e.g. device-level ratio of sums")
    n_a: int = Field(description="Requests (error_rate), timed requests (latency_ms) or observations")
    n_b: int
    value_a: float | None = Field(description="The tested estimate: error rate, mean of per-device means, "
                                  "or mean of the observations")
    value_b: float | None
    p_value: float | None = Field(description="Always-valid p-value, the running minimum over reads")
    effect_size: float | None = Field(description="B - A for error_rate; rank-biserial r over the units "
                                      "(devices or observations) otherwise")
    winner: str | None
    more_samples_needed: int
    p95_a: float | None = None
    p95_b: float | None = None
    unit: Literal["device", "observation"] = Field(
        default="device", description="What one sample is: a device, or a pushed observation (no device)")
    effect: float | None = Field(default=None, description="B - A on the metric's scale")
    ci_low: float | None = Field(default=None, description="Always-valid confidence sequence for the effect "
                                 "at `level` (running intersection over reads)")
    ci_high: float | None = None
    level: float | None = Field(default=None, description="The level this metric is tested at: alpha / k")
    tau: float | None = Field(default=None, description="Mixing scale of the mSPRT (effect of interest)")
    devices_a: int = Field(default=0, description="Devices with evidence (0 for per-observation metrics)")
    devices_b: int = 0
    devices_needed: int = Field(default=0, description="Devices per arm the sequential design needs to "
                                "detect an effect of `tau` with 80 % power (at least `min_devices`)")


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
        body.min_samples, body.alpha, who.actor, min_devices=body.min_devices, taus=dict(body.taus))))


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
            summary="Compare the arms by device: winner, always-valid p-values, effects with confidence "
                    "sequences, or how many more devices")
def recommendation(experiment_id: str, store: StoreDep, settings: SettingsDep, _: Viewer) -> dict[str, Any]:
    telemetry = None
    if settings.database_url is not None or settings.telemetry_db_path.exists():
        telemetry = TelemetryStore(settings.telemetry_database)
    try:
        return ExperimentRepo(store).recommendation(experiment_id, telemetry).to_dict()
    finally:
        if telemetry is not None:
            telemetry.close()


@router.post("/{experiment_id}/stop", response_model=ExperimentOut, summary="Stop assigning devices")
def stop_experiment(experiment_id: str, store: StoreDep, who: Operator) -> Row:
    repo = ExperimentRepo(store)
    return _out(repo, repo.stop(experiment_id, who.actor))
