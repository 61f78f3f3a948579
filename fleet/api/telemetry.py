"""Telemetry and drift routes: merged windows, drift reports, comparisons (alerts: `alerts.py`).

Reads go through the drift monitor's own `TelemetryStore` and `AlertManager` when the service
hands its monitor to the app (`ApiCollaborators`; windows still buffered in memory are then
visible); otherwise (the API alone, tests) the files under the data directory are opened on
first use and closed with the app.
Reference profiles come from the published bundles. Times are Unix seconds; a window is
`[window_start, window_start + window_s)`; `since`/`until` filter on `window_start`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, Field, StringConstraints

from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry import TelemetryReport
from fleet.access.auth import Viewer
from fleet.api.deps import ApiCollaborators, Paging
from fleet.api.schemas import PageOf
from fleet.db.files import secure_dir
from fleet.db.paging import decode_cursor, encode_cursor
from fleet.errors import FleetInputError, NotFound
from fleet.settings import FleetSettings
from fleet.telemetry.alerts import AlertManager
from fleet.telemetry.drift import DriftReport, DriftThresholds, FeatureDrift, compare_reports, report_drift
from fleet.telemetry.ingest import TelemetryStore
from fleet.telemetry.monitor import BundleProfiles
from fleet.telemetry.window_queries import histogram_quantile

_CONTEXT_LOCK = threading.Lock()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    ctx = getattr(app.state, "telemetry_context", None)
    if ctx is not None and ctx.owned:
        ctx.telemetry.close()
        ctx.alerts.close()


router = APIRouter(tags=["telemetry"], lifespan=_lifespan)

Label = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Cohort = Annotated[str, StringConstraints(max_length=200)]
Time = Annotated[float | None, Query(allow_inf_nan=False, description="Unix seconds")]
Statistic = Literal["auto", "ks", "wasserstein", "psi"]


@dataclass
class TelemetryContext:
    telemetry: TelemetryStore
    alerts: AlertManager
    profiles: Callable[[str, str], ReferenceProfile | None]
    thresholds: DriftThresholds
    owned: bool


def telemetry_context(request: Request) -> TelemetryContext:
    """The drift monitor's stores when the service handed one over, else stores opened from settings."""
    app = request.app
    with _CONTEXT_LOCK:
        ctx: TelemetryContext | None = getattr(app.state, "telemetry_context", None)
        if ctx is not None:
            return ctx
        collaborators: ApiCollaborators = app.state.collaborators
        monitor = collaborators.monitor
        if monitor is not None:
            ctx = TelemetryContext(monitor.telemetry, monitor.alerts, monitor.profiles,
                                   monitor.alerts.config.thresholds, owned=False)
        else:
            settings: FleetSettings = app.state.settings
            secure_dir(settings.data_dir)
            ctx = TelemetryContext(TelemetryStore(settings.telemetry_database),
                                   AlertManager(settings.alerts_database),
                                   BundleProfiles(app.state.store, app.state.repository),
                                   DriftThresholds(), owned=True)
        app.state.telemetry_context = ctx
        return ctx


def finite_or_none(x: float | int | None) -> float | None:
    """JSON has no NaN/inf: undefined figures are null."""
    return None if x is None or not math.isfinite(x) else float(x)


def _float(x: Any) -> float:
    return float(x)


def _int(x: Any) -> int:
    return int(x)


# -- response bodies ------------------------------------------------------------------------
class WindowOut(BaseModel):
    model: str
    version: str
    cohort: str
    window_start: float
    window_end: float
    updated_at: float
    reports: int
    device_count: int
    requests: int
    errors: int
    rejected: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_max_s: float | None


class FeatureDriftOut(BaseModel):
    name: str
    kind: str
    method: str = Field(description="Deciding statistic (`insufficient` below the minimum sample count)")
    statistic: float | None
    threshold: float | None = Field(description="Effective threshold, widened by the sketch's error")
    drifted: bool
    n_reference: int
    n_current: int
    p_value: float | None
    error: float | None
    stats: dict[str, float | None]


class _DriftVerdictOut(BaseModel):
    """The per-feature verdicts and their summary, shared by drift and compare answers."""

    features: list[FeatureDriftOut]
    outputs: list[FeatureDriftOut]
    drifted_features: list[str]
    drifted_outputs: list[str]
    drifted_share: float
    dataset_drift: bool
    prediction_drift: bool


class DriftOut(_DriftVerdictOut):
    model: str
    version: str
    cohort: str | None = Field(description="null: every cohort merged")
    since: float | None
    until: float | None
    statistic: str
    windows: int
    reports: int
    first_window: float | None
    last_window: float | None
    thresholds: dict[str, float]


class DriftPage(PageOf[DriftOut]):
    skipped: list[dict[str, str]] = Field(default_factory=list,
                                          description="Keys with telemetry but no usable reference profile")


class SideOut(BaseModel):
    version: str
    cohort: str | None
    windows: int
    reports: int


class CompareOut(_DriftVerdictOut):
    model: str
    baseline: SideOut
    candidate: SideOut
    statistic: str
    outputs_compared: bool


# -- helpers ------------------------------------------------------------------------------------
def _feature(f: FeatureDrift) -> dict[str, Any]:
    return {"name": f.name, "kind": f.kind, "method": f.method, "statistic": finite_or_none(f.statistic),
            "threshold": finite_or_none(f.threshold), "drifted": f.drifted, "n_reference": f.n_reference,
            "n_current": f.n_current, "p_value": finite_or_none(f.p_value), "error": finite_or_none(f.error),
            "stats": {k: finite_or_none(v) for k, v in f.stats.items()}}


def _verdict(d: DriftReport) -> dict[str, Any]:
    return {"features": [_feature(f) for f in d.features], "outputs": [_feature(o) for o in d.outputs],
            "drifted_features": [f.name for f in d.features if f.drifted],
            "drifted_outputs": [o.name for o in d.outputs if o.drifted],
            "drifted_share": d.drifted_share, "dataset_drift": d.dataset_drift,
            "prediction_drift": d.prediction_drift}


def _merged(ctx: TelemetryContext, model: str, version: str, cohort: str | None, since: float | None,
            until: float | None) -> tuple[TelemetryReport | None, list[dict[str, object]]]:
    windows = ctx.telemetry.windows(model, version, cohort, since, until)
    return (ctx.telemetry.query_windows(model, version, cohort, since, until) if windows else None), windows


def _check_range(since: float | None, until: float | None) -> None:
    if since is not None and until is not None and until <= since:
        raise FleetInputError(f"until ({until}) must be after since ({since})")


def _key_cursor(cursor: str | None) -> tuple[str, str, str] | None:
    if cursor is None:
        return None
    raw = decode_cursor(cursor)
    try:
        key = json.loads(str(raw))
        if isinstance(key, list) and len(key) == 3 and all(isinstance(k, str) for k in key):
            return key[0], key[1], key[2]
    except ValueError:
        pass
    raise FleetInputError(f"cursor {cursor!r} is not a cursor this route issued")


# -- routes -------------------------------------------------------------------------------------
@router.get("/v1/telemetry/windows", response_model=PageOf[WindowOut], summary="Merged telemetry windows")
def list_windows(request: Request, _: Viewer, page: Paging, model: Label | None = None,
                 version: Label | None = None, cohort: Cohort | None = None, since: Time = None,
                 until: Time = None) -> PageOf[WindowOut]:
    """Windows in time order, one per (model, version, cohort, window), with request, error and
    latency figures (latency quantiles are upper bounds of the log-bucket histogram)."""
    _check_range(since, until)
    ctx = telemetry_context(request)
    after: tuple[float, str, str, str] | None = None
    if page.cursor is not None:
        raw = decode_cursor(page.cursor)
        try:
            k = json.loads(str(raw))
            after = (float(k[0]), str(k[1]), str(k[2]), str(k[3]))
        except (ValueError, TypeError, IndexError, KeyError):
            raise FleetInputError(f"cursor {page.cursor!r} is not a cursor this route issued") from None
    rows = ctx.telemetry.window_page(model, version, cohort, since, until, after, page.limit + 1)
    window_s = ctx.telemetry.config.window_s
    items: list[WindowOut] = []
    for r in rows[:page.limit]:
        rep = r["report"]
        assert isinstance(rep, TelemetryReport)
        counts = np.asarray(rep.latency_counts)
        start = _float(r["window_start"])
        items.append(WindowOut(
            model=str(r["model"]), version=str(r["version"]), cohort=str(r["cohort"]), window_start=start,
            window_end=start + window_s, updated_at=_float(r["updated_at"]),
            reports=_int(r["reports"]), device_count=_int(r["device_count"]),
            requests=rep.requests, errors=rep.errors, rejected=rep.rejected,
            latency_p50_s=finite_or_none(histogram_quantile(counts, 0.5)),
            latency_p95_s=finite_or_none(histogram_quantile(counts, 0.95)),
            latency_max_s=finite_or_none(rep.latency_max_s) if rep.requests else None,
        ))
    nxt = None
    if len(rows) > page.limit and items:
        last = items[-1]
        nxt = encode_cursor(json.dumps([last.window_start, last.model, last.version, last.cohort]))
    return PageOf[WindowOut](items=items, next_cursor=nxt)


@router.get("/v1/drift", response_model=DriftPage, summary="Drift of merged windows against the reference")
def drift(request: Request, _: Viewer, page: Paging, model: Label | None = None, version: Label | None = None,
          cohort: Cohort | None = None, by_cohort: bool = False, since: Time = None, until: Time = None,
          statistic: Statistic = "auto") -> DriftPage:
    """One drift report per (model, version) with windows in the range (per cohort with
    `by_cohort` or a `cohort` filter), merging every matching window: per feature and output the
    deciding statistic, its widened threshold and whether it drifted, plus dataset and
    prediction drift. `statistic` forces KS, Wasserstein or PSI for numeric features."""
    _check_range(since, until)
    ctx = telemetry_context(request)
    keys = sorted({(m, v, c if (by_cohort or cohort is not None) else "")
                   for m, v, c in ctx.telemetry.window_keys()
                   if (model is None or m == model) and (version is None or v == version)
                   and (cohort is None or c == cohort)})
    after = _key_cursor(page.cursor)
    if after is not None:
        keys = [k for k in keys if k > after]
    items: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    per_cohort = by_cohort or cohort is not None
    for m, v, c in keys:
        if len(items) > page.limit:
            break
        merged, windows = _merged(ctx, m, v, c if per_cohort else None, since, until)
        if merged is None:
            continue
        profile = ctx.profiles(m, v)
        if profile is None:
            skipped.append({"model": m, "version": v, "reason": "no reference profile (bundle not found)"})
            continue
        try:
            verdict = report_drift(profile, merged, ctx.thresholds, statistic)
        except FleetInputError as exc:
            skipped.append({"model": m, "version": v, "reason": str(exc)})
            continue
        starts = [_float(w["window_start"]) for w in windows]
        items.append({
            "model": m, "version": v, "cohort": c if per_cohort else None, "since": since, "until": until,
            "statistic": statistic, "windows": len(windows),
            "reports": sum(_int(w["reports"]) for w in windows),
            "first_window": min(starts), "last_window": max(starts), **_verdict(verdict),
            "thresholds": {k: float(x) for k, x in asdict(ctx.thresholds).items()},
        })
    nxt = None
    if len(items) > page.limit:
        items = items[:page.limit]
        last = items[-1]
        nxt = encode_cursor(json.dumps([last["model"], last["version"], last["cohort"] or ""]))
    return DriftPage(items=[DriftOut.model_validate(i) for i in items], next_cursor=nxt, skipped=skipped)


@router.get("/v1/drift/compare", response_model=CompareOut,
            responses={404: {"description": "No windows for one side, or no reference profile"},
                       422: {"description": "The two versions bin their inputs differently"}},
            summary="Compare two versions (or two A/B arms / cohorts) with each other")
def compare(request: Request, _: Viewer, model: Label, baseline: Label, candidate: Label,
            baseline_cohort: Cohort | None = None, candidate_cohort: Cohort | None = None,
            since: Time = None, until: Time = None, statistic: Statistic = "auto") -> dict[str, Any]:
    """Drift of `candidate`'s merged windows against `baseline`'s (the baseline plays the
    reference). Two model versions on the same traffic, or two A/B arms: the same version with
    `baseline_cohort` and `candidate_cohort`. Both must be binned by the same reference
    profile (the baseline's); outputs are compared only when the output profiles agree."""
    _check_range(since, until)
    ctx = telemetry_context(request)
    profile = ctx.profiles(model, baseline)
    if profile is None:
        raise NotFound(f"no reference profile for {model} {baseline} (is its bundle published?)")
    other = ctx.profiles(model, candidate) if candidate != baseline else profile
    binning = [(f.kind, f.edges, f.vocabulary) for f in profile.features]
    if other is not None and [(f.kind, f.edges, f.vocabulary) for f in other.features] != binning:
        raise FleetInputError(f"{model} {baseline} and {candidate} bin their inputs by different reference "
                              "profiles: their sketches cannot be compared")
    sides: list[tuple[TelemetryReport, int, int]] = []
    for version, cohort in ((baseline, baseline_cohort), (candidate, candidate_cohort)):
        merged, windows = _merged(ctx, model, version, cohort, since, until)
        if merged is None:
            raise NotFound(f"no telemetry windows for {model} {version}"
                           + (f" cohort {cohort!r}" if cohort is not None else "") + " in the range")
        sides.append((merged, len(windows), sum(_int(w["reports"]) for w in windows)))
    same_outputs = other is not None and other.outputs == profile.outputs
    verdict = compare_reports(profile, sides[0][0], sides[1][0], ctx.thresholds, statistic,
                              compare_outputs=same_outputs)
    return {
        "model": model, "statistic": statistic, "outputs_compared": bool(verdict.outputs),
        "baseline": {"version": baseline, "cohort": baseline_cohort, "windows": sides[0][1],
                     "reports": sides[0][2]},
        "candidate": {"version": candidate, "cohort": candidate_cohort, "windows": sides[1][1],
                      "reports": sides[1][2]},
        **_verdict(verdict),
    }
