"""Model performance routes: realised accuracy (or MAE) from device labels, and the label-free
estimate, per model version, cohort and window.

`GET /v1/telemetry/performance` merges the stored windows of one model version (per cohort
with `by_cohort=true`, per window with `per_window=true`) and answers the figures of
`fleet.telemetry.performance.summarize`: realised accuracy, precision and recall per class
(classifiers) or MAE, RMSE and bias (regressors), the estimated accuracy with its 95 % band
where the bundle ships a calibration map, and the feedback outcome counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from agent.contract.performance import merge_performance_into
from agent.contract.telemetry import TelemetryReport
from agent.errors import MessageError
from fleet.access.auth import Viewer
from fleet.api.telemetry import Cohort, Label, Time, _check_range, telemetry_context
from fleet.errors import FleetInputError, NotFound
from fleet.telemetry.performance import summarize

router = APIRouter(tags=["telemetry"])
MAX_WINDOWS = 1000


class ClassOut(BaseModel):
    label: int
    support: int
    precision: float | None
    recall: float | None


class PerformanceOut(BaseModel):
    model: str
    version: str
    cohort: str | None = Field(description="null: every cohort merged")
    window_start: float | None = Field(description="null: every window in the range merged")
    windows: int
    task: str | None = Field(description="null: these windows carry no labels or confidence")
    labelled: int = 0
    accuracy: float | None = Field(None, description="Realised, from the labels devices matched")
    classes: list[ClassOut] = Field(default_factory=list)
    mae: float | None = None
    rmse: float | None = None
    bias: float | None = None
    estimate_rows: int = 0
    estimated_accuracy: float | None = Field(None, description="Mean calibrated confidence (CBPE)")
    estimate_low: float | None = None
    estimate_high: float | None = None
    feedback: dict[str, int] = Field(default_factory=dict)


class PerformancePage(BaseModel):
    items: list[PerformanceOut]


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _merge(reports: list[TelemetryReport]) -> Any:
    acc = None
    for r in reports:
        if r.performance is None:
            continue
        if acc is None:
            acc = r.performance
            continue
        try:
            merge_performance_into(acc, r.performance)
        except MessageError as exc:
            raise FleetInputError(f"stored windows do not merge: {exc}") from None
    return acc


@router.get("/v1/telemetry/performance", response_model=PerformancePage,
            summary="Realised and estimated model performance of merged windows")
def performance(request: Request, _: Viewer, model: Label, version: Label, cohort: Cohort | None = None,
                by_cohort: bool = False, per_window: bool = False, since: Time = None,
                until: Time = None) -> PerformancePage:
    """One item for the range (per cohort with `by_cohort`, per window with `per_window`, at
    most 1,000 windows). 404 when the version has no windows in the range."""
    _check_range(since, until)
    ctx = telemetry_context(request)
    windows = ctx.telemetry.windows(model, version, cohort, since, until)
    if not windows:
        raise NotFound(f"no telemetry windows for {model} {version} in that range")
    profile = ctx.profiles(model, version)
    groups: dict[tuple[str | None, float | None], list[TelemetryReport]] = {}
    for w in windows[-MAX_WINDOWS:] if per_window else windows:
        rep = w["report"]
        assert isinstance(rep, TelemetryReport)
        key_cohort = str(w["cohort"]) if (by_cohort or per_window or cohort is not None) else None
        key_start = float(str(w["window_start"])) if per_window else None
        groups.setdefault((key_cohort, key_start), []).append(rep)
    items = []
    for (c, start), reps in groups.items():
        summary = summarize(_merge(reps), profile)
        body: dict[str, Any] = {"model": model, "version": version, "cohort": c, "window_start": start,
                                "windows": len(reps), "task": None}
        if summary is not None:
            body |= {k: _clean(v) for k, v in asdict(summary).items()}
            body["classes"] = [{k: _clean(v) for k, v in cls.items()} for cls in body["classes"]]
        items.append(PerformanceOut(**body))
    return PerformancePage(items=items)
