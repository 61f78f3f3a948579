"""Drift and alert pages, and the acknowledge action.

The drift page reads what the API serves and through the API's own functions: the per cohort
and version summary is `GET /v1/drift?by_cohort=true` over the last hour
(`fleet.api.telemetry.drift`), the alerts are `GET /v1/alerts` (`list_alerts`), and the heat
map judges the same merged windows `GET /v1/telemetry/windows` lists (`drift_views`).
Acknowledging runs `fleet.api.telemetry.ack_alert` itself, so the alert store and the audit
log (`alert.ack`) record it exactly as `POST /v1/alerts/{id}/ack` does.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from fleet.api import alerts as alerts_api
from fleet.api import telemetry as telemetry_api
from fleet.api.deps import PageParams
from fleet.dashboard.drift_views import VerdictCache, heat_view
from fleet.dashboard.security import PREFIX, Dash, checked_form, redirect, render, safe_next, store_of

router = APIRouter(prefix=PREFIX, include_in_schema=False)
Label = Annotated[str, Query(max_length=200)]
SUMMARY_SPAN_S = 3600.0
MAX_NOTE = 1000


def _cache(request: Request) -> VerdictCache:
    cache: VerdictCache = request.app.state.dashboard_verdicts
    return cache


def _pick(keys: list[tuple[str, str, str]], model: str, version: str, cohort: str,
          alerts: list[dict[str, Any]]) -> tuple[str, str, str] | None:
    """The key asked for, else the one of the newest unacknowledged alert, else the first."""
    if (model, version, cohort) in keys:
        return model, version, cohort
    for a in alerts:
        if a["acked_at"] is None and (a["model"], a["version"], a["cohort"]) in keys:
            return a["model"], a["version"], a["cohort"]
    return keys[0] if keys else None


@router.get("/drift", response_class=HTMLResponse)
def drift(request: Request, session: Dash, model: Label = "", version: Label = "", cohort: Label = "",
          feature: Label = "") -> HTMLResponse:
    """Summary per cohort and version, heat map per feature and window, histograms, alerts."""
    ctx = telemetry_api.telemetry_context(request)
    principal = session.principal
    keys = ctx.telemetry.window_keys()
    recent = alerts_api.list_alerts(request, principal, PageParams(50, None)).items
    chosen = _pick(keys, model, version, cohort, [a.model_dump() for a in recent])
    summary = telemetry_api.drift(request, principal, PageParams(100, None), by_cohort=True,
                                  since=time.time() - SUMMARY_SPAN_S)
    view: dict[str, Any] = {"heat": None, "problems": [], "windows": [], "feature": None, "histogram": None}
    alerts: list[Any] = []
    if chosen is not None:
        view = heat_view(ctx, _cache(request), *chosen, feature or None)
        alerts = alerts_api.list_alerts(request, principal, PageParams(50, None), model=chosen[0],
                                           version=chosen[1], cohort=chosen[2]).items
    series = dict(zip(("model", "version", "cohort"), chosen, strict=True)) if chosen else {}
    here = PREFIX + "/drift" + ("?" + urlencode(series) if series else "")  # an ack comes back here
    page = {"page": "drift", "keys": keys, "chosen": chosen, "summary": summary, "alerts": alerts,
            "next_url": here, **view}
    return render(request, "drift.html", page, session=session)


KIND_LABELS = (("drift", "drift alerts"), ("retrain", "retraining triggers"),
               ("error_rate", "error-rate regressions"), ("latency", "latency regressions"),
               ("offline", "devices offline"), ("rollout_gate", "rollouts stopped by a gate"))


@router.get("/alerts", response_class=HTMLResponse)
def alerts(request: Request, session: Dash,
           kind: Literal["", "drift", "retrain", "error_rate", "latency", "offline", "rollout_gate"] = "",
           acked: Literal["", "yes", "no"] = "",
           cursor: Annotated[str | None, Query(max_length=256)] = None) -> HTMLResponse:
    """Every alert and retraining trigger, newest first, with its evidence (`GET /v1/alerts`)."""
    flag = {"yes": True, "no": False}.get(acked)
    page = alerts_api.list_alerts(request, session.principal, PageParams(50, cursor), kind=kind or None,
                                     acked=flag)
    here = request.url.path + ("?" + request.url.query if request.url.query else "")
    ctx = {"page": "drift", "alerts": page.items, "next_cursor": page.next_cursor, "kind": kind,
           "kinds": KIND_LABELS, "acked": acked, "next_url": here}
    return render(request, "alerts.html", ctx, session=session)


@router.post("/alerts/{alert_id}/ack")
async def ack(request: Request, session: Dash, alert_id: Annotated[int, Path(ge=1)]) -> object:
    """Acknowledge (operator; CSRF-checked) through the API's route function, then go back."""
    form = await checked_form(request, session)
    body = alerts_api.AckIn(note=form.get("note", "")[:MAX_NOTE])
    await run_in_threadpool(alerts_api.ack_alert, alert_id, body, request, store_of(request),
                            session.principal)
    back = safe_next(form.get("next"))
    return redirect(back + ("&" if "?" in back else "?") + f"acked={alert_id}")
