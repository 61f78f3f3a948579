"""Pages of the fleet overview, the devices and the model registry (all read-only).

The overview's counts are also served as an htmx fragment (`/ui/fragments/counts`) that the
page polls every few seconds, so they follow the fleet without a reload. Lists take the API's
own filters (a label selector for devices) and page with the store's keyset cursors.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from agent.errors import EdgefleetError
from fleet.api.telemetry import telemetry_context
from fleet.dashboard.accuracy_views import accuracy_view
from fleet.dashboard.security import PREFIX, Dash, render, store_of
from fleet.dashboard.views import (
    BundleInfo,
    device_detail,
    device_page,
    fleet_counts,
    recent_events,
    safe_models_page,
    version_detail,
)
from fleet.db.session import DatabaseError
from fleet.devices.selector import MAX_SELECTOR_LEN
from fleet.errors import FleetError, FleetInputError

router = APIRouter(prefix=PREFIX, include_in_schema=False)
Text = Annotated[str, Query(max_length=MAX_SELECTOR_LEN)]
Cursor = Annotated[str | None, Query(max_length=256)]


def _alert_counts(request: Request) -> dict[str, int]:
    """Unacknowledged drift alerts and retraining triggers (zero when telemetry is unavailable)."""
    try:
        rows = telemetry_context(request).alerts.counts()
    except FleetError:
        return {"drift": 0, "retrain": 0}
    out = {"drift": 0, "retrain": 0}
    for r in rows:
        out[r["kind"]] = out.get(r["kind"], 0) + int(r["unacked"] or 0)
    return out


def _counts_context(request: Request) -> dict[str, Any]:
    return {"counts": fleet_counts(store_of(request)), "alert_counts": _alert_counts(request)}


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, session: Dash) -> HTMLResponse:
    """Devices by version, state, cohort, label, online; rollouts by state; recent audit entries."""
    ctx = {"page": "overview", "events": recent_events(store_of(request)), **_counts_context(request)}
    return render(request, "overview.html", ctx, session=session)


@router.get("/fragments/counts", response_class=HTMLResponse)
def overview_counts(request: Request, session: Dash) -> HTMLResponse:
    """The overview's counts alone, for htmx polling."""
    return render(request, "_counts.html", {"page": "overview", **_counts_context(request)}, session=session)


@router.get("/devices", response_class=HTMLResponse)
def devices(request: Request, session: Dash, selector: Text = "", online: str = "",
            cursor: Cursor = None) -> HTMLResponse:
    """Devices matching a label selector (the API's syntax), optionally only on- or offline."""
    flag = {"yes": True, "no": False}.get(online)
    error = ""
    try:
        page = device_page(store_of(request), selector, flag, cursor, 100)
    except FleetInputError as exc:  # a bad selector is the user's typo: say so on the page
        page, error = {"items": [], "next_cursor": None}, str(exc)
    ctx = {"page": "devices", "selector": selector, "online": online, "error": error, **page}
    return render(request, "devices.html", ctx, session=session)


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device(request: Request, session: Dash, device_id: str) -> HTMLResponse:
    """One device: bundles, last reported state, rollout progress, audit entries, its alerts."""
    detail = device_detail(store_of(request), device_id)
    alerts: list[dict[str, Any]] = []
    try:
        recent = telemetry_context(request).alerts.page(limit=200)
        alerts = [a for a in recent if device_id in a["devices"]][:20]
    except FleetError:
        pass
    return render(request, "device.html", {"page": "devices", **detail, "alerts": alerts}, session=session)


def _bundles(request: Request) -> BundleInfo:
    info: BundleInfo = request.app.state.dashboard_bundles
    return info


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, session: Dash) -> HTMLResponse:
    """Every model and version: stage, runtime, bundle size, quantization, devices running it."""
    items, error = safe_models_page(store_of(request), _bundles(request))
    ctx = {"page": "models", "models": items, "error": error}
    return render(request, "models.html", ctx, session=session)


@router.get("/models/{name}/versions/{version}", response_class=HTMLResponse)
def model_version(request: Request, session: Dash, name: str, version: str) -> HTMLResponse:
    """One version: lineage, quantization gate figures, bundle, stage history, rollouts."""
    detail = version_detail(store_of(request), _bundles(request), name, version)
    accuracy, accuracy_error = None, ""
    try:  # the telemetry stores may be unreachable; the rest of the page still shows
        accuracy = accuracy_view(telemetry_context(request), name, version)
    except (EdgefleetError, DatabaseError) as exc:
        accuracy_error = f"accuracy unavailable: {exc}"
    return render(request, "version.html", {"page": "models", **detail, "accuracy": accuracy,
                                            "accuracy_error": accuracy_error}, session=session)
