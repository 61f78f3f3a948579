"""Alert routes: alerts and retraining triggers, newest first, and their (audited) acknowledgement.

Alerts are read through the same `TelemetryContext` as the telemetry routes (the drift monitor's
`AlertManager` when the service hands one over, else one opened from the settings).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleet.access.auth import Operator, Viewer
from fleet.api.deps import Paging, StoreDep
from fleet.api.schemas import PageOf
from fleet.api.telemetry import Cohort, Label, TelemetryContext, finite_or_none, telemetry_context
from fleet.db.paging import decode_cursor, encode_cursor
from fleet.errors import FleetInputError

router = APIRouter(tags=["telemetry"])

AlertKind = Literal["drift", "retrain", "error_rate", "latency", "offline", "rollout_gate"]


class AlertOut(BaseModel):
    id: int
    kind: AlertKind
    model: str
    version: str
    cohort: str
    subject: str = Field(description="drift: feature, `output:<name>`, `dataset` or `prediction`; "
                         "error_rate/latency: the kind; offline: `devices`; rollout_gate: the rollout id")
    statistic: str
    value: float | None
    threshold: float | None
    window_start: float
    window_s: float
    windows: int
    devices: list[str]
    device_count: int
    created_at: float
    delivered: bool
    delivery_error: str
    acked_by: str | None
    acked_at: float | None
    ack_note: str | None
    episode: int = Field(description="Id of the alert that opened this alert's episode (itself if it did)")
    escalation: int = Field(0, description="0: opened the episode; n: its n-th escalation")
    features: list[str] = Field(default_factory=list, description="What the episode names now: drifted "
                                "features (dataset), offline devices, breached stages")
    baseline: str = Field("", description="The version a regression was judged against")
    detail: str = ""
    evidence: dict[str, float | None] = Field(default_factory=dict)


class AckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: Annotated[str, StringConstraints(max_length=1000)] = ""


def _alert_out(row: dict[str, Any]) -> AlertOut:
    evidence = {k: finite_or_none(v) for k, v in (row.get("evidence") or {}).items()}
    return AlertOut.model_validate({**row, "value": finite_or_none(row["value"]),
                                    "threshold": finite_or_none(row["threshold"]), "evidence": evidence})


def _alert_page(ctx: TelemetryContext, page: Any, kind: str | None, **filters: Any) -> PageOf[AlertOut]:
    before: int | None = None
    if page.cursor is not None:
        raw = decode_cursor(page.cursor)
        if not isinstance(raw, int):
            raise FleetInputError(f"cursor {page.cursor!r} is not a cursor this route issued")
        before = raw
    rows = ctx.alerts.page(before, page.limit + 1, kind=kind, **filters)
    items = [_alert_out(r) for r in rows[:page.limit]]
    nxt = encode_cursor(items[-1].id) if len(rows) > page.limit and items else None
    return PageOf[AlertOut](items=items, next_cursor=nxt)


@router.get("/v1/alerts", response_model=PageOf[AlertOut], summary="Alerts and triggers, newest first")
def list_alerts(request: Request, _: Viewer, page: Paging, kind: AlertKind | None = None,
                model: Label | None = None, version: Label | None = None, cohort: Cohort | None = None,
                subject: Label | None = None, acked: bool | None = None) -> PageOf[AlertOut]:
    """One alert per episode (plus its escalations): `drift` per drifting subject, `retrain` the
    triggers, `error_rate`/`latency` regressions against the cohort's baseline version, `offline`
    devices, `rollout_gate` rollouts a gate paused or aborted."""
    return _alert_page(telemetry_context(request), page, kind, model=model, version=version, cohort=cohort,
                       subject=subject, acked=acked)


@router.get("/v1/triggers", response_model=PageOf[AlertOut], summary="Retraining triggers, newest first")
def list_triggers(request: Request, _: Viewer, page: Paging, model: Label | None = None,
                  version: Label | None = None, cohort: Cohort | None = None,
                  acked: bool | None = None) -> PageOf[AlertOut]:
    """Fired once per persisting dataset/prediction drift episode (`persist_windows` windows)."""
    return _alert_page(telemetry_context(request), page, "retrain", model=model, version=version,
                       cohort=cohort, acked=acked)


@router.post("/v1/alerts/{alert_id}/ack", response_model=AlertOut,
             responses={404: {"description": "No such alert"}, 409: {"description": "Already acknowledged"}},
             summary="Acknowledge an alert or trigger (audited)")
def ack_alert(alert_id: int, body: AckIn, request: Request, store: StoreDep, who: Operator) -> AlertOut:
    ctx = telemetry_context(request)
    before, after = ctx.alerts.ack(alert_id, who.actor, body.note)
    store.audit.record(who.actor, "alert.ack", f"alerts/{alert_id}",
                       {"acked_at": before["acked_at"]},
                       {"acked_at": after["acked_at"], "acked_by": who.actor, "note": body.note})
    return _alert_out(after)
