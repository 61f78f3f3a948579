"""Approval gates: a stage that `requires_approval` starts only once an operator approved it.

Pure decisions over the rollout's snapshot, the strategy's `ApprovalPolicy`, the runtime's
`approved_stage` / `approval_requested_at` and an injected clock; the controller persists
what they return (the state change through the transition table, the approval columns, the
consumed `approve` command) in one transaction.

The path of a gated stage: `running` --approval_required--> `awaiting_approval` (nothing new
is assigned; devices still in flight keep reporting), then either an `approve` command
(queued by an operator through the API, CLI or dashboard, and audited there)
--approved--> `running`, or the policy's `timeout_s` passes --approval_timeout_pause-->
`paused` (an approval may still arrive: it is recorded, and `resume` starts the stage) or
--approval_timeout_abort--> `rolling_back`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.rollouts.machine import Command, Decision, RolloutEvent, RolloutSnapshot, RolloutState, Work
from fleet.rollouts.policies import needs_approval
from fleet.rollouts.strategies import StrategyConfig

S, E = RolloutState, RolloutEvent


@dataclass(frozen=True)
class ApprovalStep:
    """What to persist: the decision, and whether it approves the stage or starts the wait.

    `gated`: the stage may not assign devices this tick (waiting, or just began waiting).
    """

    decision: Decision
    approves: bool = False
    requests: bool = False
    gated: bool = False

    @property
    def writes(self) -> bool:
        """Something to persist (a state change, a consumed command or an approval column)."""
        return bool(self.decision.events or self.decision.consumes or self.approves or self.requests)

    @property
    def pauses(self) -> bool:
        """The approval timed out into `paused`: the controller records a `pause` intent too."""
        return E.APPROVAL_TIMEOUT_PAUSE in self.decision.events

    def runtime(self, stage: int, now: float) -> dict[str, float | int]:
        """The `rollout_runtime` columns it sets: the approved stage, or when the wait began."""
        out: dict[str, float | int] = {}
        if self.approves:
            out["approved_stage"] = stage
        if self.requests:
            out["approval_requested_at"] = now
        return out


def decide_approval(s: RolloutSnapshot, cfg: StrategyConfig, approved_stage: int,
                    requested_at: float | None, now: float) -> ApprovalStep | None:
    """The approval gate of the current stage; None when it does not hold the rollout."""
    policy = cfg.approval
    approve = s.commands.get(Command.APPROVE)
    if s.state is S.AWAITING_APPROVAL:
        if approve is not None:
            return ApprovalStep(Decision((E.APPROVED,), Work.FORWARD, note=f"stage {s.stage} approved by "
                                         f"{approve.actor}: {approve.note}".rstrip(": "), consumes=approve),
                                approves=True)
        timeout = policy.timeout_s if policy is not None else 0.0
        if requested_at is not None and now - requested_at >= timeout:
            action = policy.on_timeout if policy is not None else "pause"
            event = E.APPROVAL_TIMEOUT_ABORT if action == "abort" else E.APPROVAL_TIMEOUT_PAUSE
            return ApprovalStep(Decision((event,), note=f"stage {s.stage} not approved within "
                                         f"{timeout:.0f}s: {action}"), gated=True)
        return ApprovalStep(Decision(), gated=True)
    if s.state is S.PAUSED and approve is not None:  # a late approval: recorded, `resume` starts it
        return ApprovalStep(Decision(note=f"stage {s.stage} approved by {approve.actor} while paused",
                                     consumes=approve), approves=True, gated=True)
    if s.state is S.RUNNING and needs_approval(policy, s.stage, approved_stage):
        return ApprovalStep(Decision((E.APPROVAL_REQUIRED,), note=f"stage {s.stage} waits for approval"),
                            requests=True, gated=True)
    return None
