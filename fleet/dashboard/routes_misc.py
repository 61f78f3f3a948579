"""Experiment and audit log pages (read-only), through the API's own functions.

The recommendation is `GET /v1/experiments/{id}/recommendation` itself
(`fleet.api.experiments.recommendation`): pushed observations plus each version's telemetry
windows, per metric the test, the arms' values, the p-value, the effect size, the winner or how
many more samples are needed. The audit log filters like `GET /v1/audit` (exact resource,
actor, action) and pages with its cursor.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from fleet.api import experiments as experiments_api
from fleet.dashboard.security import PREFIX, Dash, render, store_of
from fleet.db.rows import Row
from fleet.rollouts.experiments import ExperimentRepo

router = APIRouter(prefix=PREFIX, include_in_schema=False)
Filter = Annotated[str, Query(max_length=300)]
Cursor = Annotated[str | None, Query(max_length=256)]


def _with_arms(repo: ExperimentRepo, row: Row) -> Row:
    arms = list(repo.devices(row["id"]).values())
    return {**row, "devices": {"a": arms.count("a"), "b": arms.count("b")}}


@router.get("/experiments", response_class=HTMLResponse)
def experiments(request: Request, session: Dash, cursor: Cursor = None) -> HTMLResponse:
    """A/B experiments with their arms and device counts."""
    repo = ExperimentRepo(store_of(request))
    page = repo.list(cursor, 100)
    items = [_with_arms(repo, r) for r in page.items]
    return render(request, "experiments.html", {"page": "experiments", "items": items,
                                                "next_cursor": page.next_cursor}, session=session)


@router.get("/experiments/{experiment_id}", response_class=HTMLResponse)
def experiment(request: Request, session: Dash, experiment_id: str) -> HTMLResponse:
    """One experiment: its design, per-arm devices and the recommendation with its figures."""
    store = store_of(request)
    repo = ExperimentRepo(store)
    row = _with_arms(repo, repo.get(experiment_id))
    rec: dict[str, Any] = experiments_api.recommendation(experiment_id, store, request.app.state.settings,
                                                         session.principal)
    return render(request, "experiment.html", {"page": "experiments", "experiment": row, "rec": rec},
                  session=session)


@router.get("/audit", response_class=HTMLResponse)
def audit(request: Request, session: Dash, resource: Filter = "", actor: Filter = "", action: Filter = "",
          cursor: Cursor = None) -> HTMLResponse:
    """The audit log, newest first, filtered by exact resource, actor and action."""
    page = store_of(request).audit.list(cursor, 100, resource or None, actor or None, action or None)
    ctx = {"page": "audit", "items": page.items, "next_cursor": page.next_cursor, "resource": resource,
           "actor": actor, "action": action}
    return render(request, "audit.html", ctx, session=session)
