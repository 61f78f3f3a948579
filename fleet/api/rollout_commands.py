"""Rollout commands beyond pause/resume/abort: promote, rollback and cancel.

Like the intent routes they only record what the operator asked (queued in
`rollout_commands`, audited); the rollout controller acts on its next tick:
- `promote`: advance to the next stage now (skipping the bake, and a gate pause of this stage);
- `rollback`: send every assigned device back to its previous bundle (also after completion);
- `cancel`: stop at once from any unfinished state, leaving devices as they are;
- `approve`: let the stage that `requires_approval` start (operator role, like every command here;
  audited when queued; a viewer gets 403).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from fleet.access.auth import Operator
from fleet.api.deps import StoreDep
from fleet.api.schemas import RolloutAction, RolloutOut
from fleet.rollouts.records import COMMANDS, RolloutRecords

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"description": "Refused: finished rollout, the same command is already queued, or an approve "
                         "of a rollout that awaits no approval"},
}
_SUMMARIES = {
    "promote": "Advance to the next stage now (skips the bake time)",
    "rollback": "Send every assigned device back to the bundle it ran before",
    "cancel": "Stop the rollout at once, from any unfinished state",
    "approve": "Approve the stage the rollout awaits (`awaiting_approval`, or paused by its timeout)",
}


def _command(command: str) -> None:
    def route(rollout_id: str, body: RolloutAction, store: StoreDep, who: Operator) -> RolloutOut:
        RolloutRecords(store).command(rollout_id, command, who.actor, body.note)
        return RolloutOut.model_validate(store.rollouts.get(rollout_id))

    route.__name__ = f"{command}_rollout"
    router.add_api_route(f"/{{rollout_id}}/{command}", route, methods=["POST"], response_model=RolloutOut,
                         status_code=202, responses=_CONFLICT, summary=_SUMMARIES[command])


for _name in COMMANDS:
    _command(_name)
