"""Rollout pages and actions: list, detail (with a progress fragment htmx polls), and
pause / resume / promote / abort / rollback behind a confirmation step.

An action is two requests: `GET .../confirm/{action}` shows what the action does and a form
(inline through htmx, or as a page without script); its `POST .../{action}` checks the CSRF
token and the operator role, then runs the API's own call (`rollout_views.perform`) with the
session's principal, so the audit log shows the same actor and action as `POST
/v1/rollouts/{id}/{action}`. A refused transition answers a 409 page naming the reason.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from fleet.dashboard.rollout_views import ACTION_TEXT, ACTIONS, perform, rollout_detail, rollout_list
from fleet.dashboard.security import PREFIX, Dash, checked_form, redirect, render, require_role, store_of
from fleet.errors import NotFound

router = APIRouter(prefix=PREFIX, include_in_schema=False)
MAX_NOTE = 1000


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts(request: Request, session: Dash, state: str = "",
             cursor: Annotated[str | None, Query(max_length=256)] = None) -> HTMLResponse:
    """Rollouts (optionally of one state) with their device counts."""
    data = rollout_list(store_of(request), state, cursor, 100)
    return render(request, "rollouts.html", {"page": "rollouts", "state": state, **data}, session=session)


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout(request: Request, session: Dash, rollout_id: str, done: str = "") -> HTMLResponse:
    """Stages, per-status counts, gates and their evidence, history, devices, actions."""
    detail = rollout_detail(store_of(request), rollout_id)
    return render(request, "rollout.html", {"page": "rollouts", "done": done if done in ACTIONS else "",
                                            **detail}, session=session)


@router.get("/rollouts/{rollout_id}/progress", response_class=HTMLResponse)
def rollout_progress(request: Request, session: Dash, rollout_id: str) -> HTMLResponse:
    """The state, stage and counts part of the rollout page alone, for htmx polling."""
    detail = rollout_detail(store_of(request), rollout_id)
    return render(request, "_rollout_progress.html", {"page": "rollouts", **detail}, session=session)


@router.get("/rollouts/{rollout_id}/confirm/{action}", response_class=HTMLResponse)
def confirm(request: Request, session: Dash, rollout_id: str, action: str) -> HTMLResponse:
    """What the action will do, and the form that does it (operators only)."""
    if action not in ACTIONS:
        raise NotFound(f"no rollout action {action!r}; actions: {', '.join(ACTIONS)}")
    require_role(session, "operator")
    ro = store_of(request).rollouts.get(rollout_id)
    fragment = bool(request.headers.get("hx-request"))
    ctx = {"page": "rollouts", "rollout": ro, "action": action, "explain": ACTION_TEXT[action],
           "fragment": fragment}
    return render(request, "confirm.html", ctx, session=session)


@router.post("/rollouts/{rollout_id}/{action}")
async def act(request: Request, session: Dash, rollout_id: str, action: str) -> object:
    """Run a confirmed action (CSRF + operator checked first), then show the rollout again."""
    if action not in ACTIONS:
        raise NotFound(f"no rollout action {action!r}; actions: {', '.join(ACTIONS)}")
    form = await checked_form(request, session)
    note = form.get("note", "")[:MAX_NOTE]
    await run_in_threadpool(perform, store_of(request), rollout_id, action, session.principal.actor, note)
    return redirect(f"{PREFIX}/rollouts/{rollout_id}?done={action}")
