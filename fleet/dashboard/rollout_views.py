"""View models of the rollout pages, and the rollout actions the dashboard offers.

Actions run the exact calls of their API routes (`store.rollouts.request` for pause, resume
and abort as `POST /v1/rollouts/{id}/pause|resume|abort`; `RolloutRecords.command` for promote
rollback and approve as `POST /v1/rollouts/{id}/promote|rollback|approve`), with the same
principal (approving needs the operator role, like every action), so the
audit log records them the same way and the same transitions are refused (Conflict, 409).
`allowed_actions` only decides which buttons to show; the store still has the last word.

Gate evidence comes from three places, all written by the controller: the stage's outcome
counts (install failures, local rollbacks) evaluated here with the rollout's own thresholds
by `fleet.rollouts.gates.evaluate`, the breach it recorded for the current stage
(`RolloutRuntime.breach`, a `GateBreach`), and every `rollout.gate_breach` entry of the audit log. Metric
gates (error rate, latency, drift, shadow agreement) are evaluated by the controller on each
tick; their figures appear here when they crossed a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet.dashboard.charts import status_bar
from fleet.errors import FleetInputError
from fleet.rollouts.gates import GateThresholds, evaluate
from fleet.rollouts.machine import FINISHED_STATES, Desired, RolloutState
from fleet.rollouts.record_types import outcome_counts
from fleet.rollouts.records import RolloutRecords
from fleet.rollouts.store import ACTIONS as INTENTS
from fleet.rollouts.store import STATES, Rollout, RolloutStatusSummary
from fleet.rollouts.strategies import StrategyConfig
from fleet.store import Store

ACTIONS = ("approve", "pause", "resume", "promote", "abort", "rollback")
ACTION_TEXT = {
    "approve": "Let the stage that waits for approval start (audited with your name). Paused because the "
               "approval timed out? Approve, then resume.",
    "pause": "The controller stops assigning devices; devices already updating finish. Resume continues.",
    "resume": "The controller continues from the current stage (a gate breach of this stage counts as "
              "acknowledged).",
    "promote": "Advance to the next stage now, skipping the rest of this stage's bake time "
               "(and a gate pause of this stage).",
    "abort": "Stop the rollout and send every device that got the new bundle back to the one it ran "
             "before. This cannot be undone.",
    "rollback": "Send every assigned device back to the bundle it ran before (also after completion). "
                "This cannot be undone.",
}


@dataclass(frozen=True)
class RolloutSummary:
    """A rollout of the rollouts list with its devices counted per status."""

    rollout: Rollout
    status: RolloutStatusSummary


def allowed_actions(rollout: Rollout, pending: set[str]) -> list[str]:
    """The actions worth offering in this state (mirrors the store's refusal rules)."""
    state, desired = rollout.state, rollout.desired
    finished = state in FINISHED_STATES
    out: list[str] = []
    if state is RolloutState.AWAITING_APPROVAL and "approve" not in pending:
        out.append("approve")
    if not finished and desired is Desired.RUN:
        out.append("pause")
    if not finished and desired is Desired.PAUSE:
        out.append("resume")
    if not finished and state not in (RolloutState.ROLLING_BACK, RolloutState.AWAITING_APPROVAL) \
            and "promote" not in pending and desired is not Desired.ABORT:
        out.append("promote")
    if not finished and desired is not Desired.ABORT:
        out.append("abort")
    if (not finished or state is RolloutState.COMPLETED) and state is not RolloutState.ROLLING_BACK \
            and "rollback" not in pending:
        out.append("rollback")
    return out


def perform(store: Store, rollout_id: str, action: str, actor: str, note: str) -> None:
    """Run `action` through the API's own calls. Raises NotFound, Conflict, FleetInputError."""
    if action not in ACTIONS:
        raise FleetInputError(f"action {action!r} must be one of {', '.join(ACTIONS)}")
    if action in INTENTS:
        store.rollouts.request(rollout_id, action, actor, note)
    else:  # approve, promote, rollback: commands queued for the controller
        RolloutRecords(store).command(rollout_id, action, actor, note)


def rollout_list(store: Store, state: str | None, cursor: str | None, limit: int) -> dict[str, Any]:
    """A page of rollouts, each with its device counts. Raises FleetInputError (state)."""
    page = store.rollouts.list(cursor, limit, state or None)
    items = [RolloutSummary(r, store.rollouts.status(r.id)) for r in reversed(page.items)]
    return {"items": items, "next_cursor": page.next_cursor, "states": STATES}


def _stages(strategy: StrategyConfig, current: int, state: RolloutState) -> list[dict[str, Any]]:
    shares = list(strategy.stages) if strategy.kind == "canary" else [100.0]
    done_all = state is RolloutState.COMPLETED
    return [{"index": i, "percent": pct,
             "state": "done" if done_all or i < current else ("current" if i == current else "todo")}
            for i, pct in enumerate(shares)]


def rollout_detail(store: Store, rollout_id: str) -> dict[str, Any]:
    """Everything the rollout page shows (see the module docstring). Raises NotFound."""
    rollout = store.rollouts.get(rollout_id)
    status = store.rollouts.status(rollout_id)
    records = RolloutRecords(store)
    strategy = StrategyConfig.parse(rollout.strategy)
    thresholds = GateThresholds.parse(rollout.thresholds)
    counts = outcome_counts(records.progress(rollout_id))
    live = [b.to_dict() for b in evaluate(thresholds, counts)]
    runtime = records.runtime(rollout_id)
    pending = {c.command.value for c in records.pending_commands(rollout_id)}
    finished = counts.finished
    failed = counts.install_failed + counts.timeout
    return {
        "rollout": rollout, "status": status, "strategy": strategy,
        "stages": _stages(strategy, rollout.stage, rollout.state),
        "segments": status_bar(status.devices_by_status),
        "thresholds": thresholds.model_dump(), "counts": counts,
        "outcome_figures": {
            "finished": finished,
            "install_failure_pct": 100.0 * failed / finished if finished else None,
            "rollback_pct": 100.0 * counts.local_rollback / finished if finished else None,
        },
        "live_breaches": live, "breach": runtime.breach if runtime is not None else None,
        "breach_log": store.audit.list(None, 20, resource=f"rollouts/{rollout_id}",
                                       action="rollout.gate_breach").items,
        "history": list(reversed(rollout.history)),
        "devices": store.rollouts.devices(rollout_id, None, 100).items,
        "pending": sorted(pending), "actions": allowed_actions(rollout, pending),
        "target_bundle": runtime.target_bundle if runtime is not None else None,
        "phase": runtime.phase.value if runtime is not None else None,
        "approval": strategy.approval, "budget": strategy.budget, "windows": strategy.windows,
        "success_threshold": strategy.success_threshold(rollout.stage),
    }
