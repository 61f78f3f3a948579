"""Rollout routes: create, read, status, and operator intent (pause/resume/abort).

These routes store intent only. The rollout controller acts on it; until one runs, a
rollout's `state` stays what the controller last wrote (`pending` at creation).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from fleet.access.auth import Operator, Viewer
from fleet.api.deps import Paging, RepositoryDep, StoreDep, idempotent_create
from fleet.api.schemas import (
    PageOf,
    RolloutAction,
    RolloutCreate,
    RolloutDeviceOut,
    RolloutOut,
    RolloutStatus,
)
from fleet.devices.selector import parse_selector
from fleet.rollouts.compatibility import check_cohort
from fleet.rollouts.gates import GateThresholds
from fleet.rollouts.policies import POLICY_FIELDS, PolicyError, check_cohort_policies
from fleet.rollouts.records import RolloutRecords
from fleet.rollouts.store import STATES
from fleet.rollouts.strategies import StrategyConfig
from fleet.store import Store

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])
_CONFLICT: dict[int | str, dict[str, Any]] = {
   409: {"description": "Refused: finished rollout, same intent, idempotency key reused, or the cohort "
                        "serves another model or schema (without `allow_model_change`)"},
}
_POLICY: dict[int | str, dict[str, Any]] = {400: {"description": (
    "A site policy that cannot work: a disruption budget that would starve a group, a malformed cron "
    "expression, an unknown time zone (`loc` names it)")}}


def _policy_refusal(problems: list[tuple[tuple[str | int, ...], str]]) -> HTTPException:
    return HTTPException(400, detail=[{"loc": list(loc), "msg": msg, "type": "invalid_policy"}
                                      for loc, msg in problems])


def check_policies(body: RolloutCreate, store: Store) -> None:
    """Refuse (400) site policies that are malformed or can never let this cohort progress.

    The rest of a bad strategy is left to `StrategyConfig.parse` (422 like any invalid field).
    """
    try:
        cfg = StrategyConfig.model_validate(body.strategy or {})
    except ValidationError as exc:
        problems = [(("body", "strategy", *e["loc"]), e["msg"]) for e in exc.errors()
                    if e["loc"] and e["loc"][0] in POLICY_FIELDS]
        if problems:
            raise _policy_refusal(problems) from None
        return
    if cfg.budget is None and cfg.windows is None:
        return
    devices = store.devices.ids_matching(parse_selector(body.selector))
    try:
        check_cohort_policies(cfg.budget, cfg.windows, RolloutRecords(store).labels_of(devices).items())
    except PolicyError as exc:
        raise _policy_refusal([(exc.loc, str(exc))]) from None


@router.get("", response_model=PageOf[RolloutOut], summary="List rollouts")
def list_rollouts(_: Viewer, store: StoreDep, page: Paging, state: str | None = None) -> PageOf[RolloutOut]:
    p = store.rollouts.list(page.cursor, page.limit, state)
    return PageOf[RolloutOut].model_validate(p, from_attributes=True)


list_rollouts.__doc__ = f"`state` is one of {', '.join(STATES)}."


@router.post("", response_model=RolloutOut, status_code=201, responses={**_CONFLICT, **_POLICY},
             summary="Create a rollout (recorded as pending; the controller starts it)")
def create_rollout(body: RolloutCreate, request: Request, store: StoreDep, repository: RepositoryDep,
                   who: Operator) -> JSONResponse:
    check_policies(body, store)  # 400: a budget that starves a group, a bad cron or time zone
    StrategyConfig.parse(body.strategy)  # refuse a plan the controller could not run (422)
    GateThresholds.parse(body.thresholds)
    if not body.allow_model_change:  # 409 when the cohort serves another model or schema
        check_cohort(store, repository, body.model_version_id, body.selector)
    return idempotent_create(request, who, body, RolloutOut, lambda: store.rollouts.create(
        body.model_version_id, body.selector, body.strategy, body.thresholds, who.actor))


@router.get("/{rollout_id}", response_model=RolloutOut, summary="Read a rollout")
def get_rollout(rollout_id: str, store: StoreDep, _: Viewer) -> RolloutOut:
    return RolloutOut.model_validate(store.rollouts.with_warnings(store.rollouts.get(rollout_id)))


@router.get("/{rollout_id}/status", response_model=RolloutStatus, summary="State and device counts")
def rollout_status(rollout_id: str, store: StoreDep, _: Viewer) -> RolloutStatus:
    return RolloutStatus.model_validate(store.rollouts.status(rollout_id))


@router.get("/{rollout_id}/devices", response_model=PageOf[RolloutDeviceOut],
            summary="Per-device progress (written by the controller)")
def rollout_devices(rollout_id: str, _: Viewer, store: StoreDep, page: Paging,
                    status: str | None = None) -> PageOf[RolloutDeviceOut]:
    p = store.rollouts.devices(rollout_id, page.cursor, page.limit, status)
    return PageOf[RolloutDeviceOut].model_validate(p, from_attributes=True)


def _action(action: str) -> None:
    def route(rollout_id: str, body: RolloutAction, store: StoreDep, who: Operator) -> RolloutOut:
        return RolloutOut.model_validate(store.rollouts.request(rollout_id, action, who.actor, body.note))

    route.__name__ = f"{action}_rollout"
    router.add_api_route(f"/{{rollout_id}}/{action}", route, methods=["POST"], response_model=RolloutOut,
                         responses=_CONFLICT, summary=f"Ask the controller to {action} the rollout")


for _name in ("pause", "resume", "abort"):
    _action(_name)
