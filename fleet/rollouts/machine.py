"""The rollout lifecycle: one declarative transition table and pure decisions over it.

Why a table: every state change a rollout can make is visible in one place (and rendered
in docs/rollouts.md), the controller changes a rollout's `state` only through `transition`,
which refuses a pair the table does not allow, and a test walks the table to prove that
every state is reachable from `pending` and that every unfinished rollout can end.

Why pure decisions: what the next event is depends only on the rollout's record (its state,
stage, the operator's `desired` intent, the queued commands) and the clock, so the
decisions below take a `RolloutSnapshot` and an injected `now` and return the event to fire
and the work to do next; `fleet.rollouts.controller` keeps the I/O (signing, publishing,
writing), persists the new state before the work it leads to, and resumes from the stored
state after a restart. Nothing here reads or writes anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from fleet.errors import FleetMisuseError
from fleet.rollouts.gates import OutcomeCounts
from fleet.rollouts.strategies import StrategyConfig, stage_count, stage_ready_to_advance


class RolloutState(StrEnum):
    """A rollout's `state` column (written by the controller only). Order = docs and metrics."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    CANCELLED = "cancelled"
    AWAITING_APPROVAL = "awaiting_approval"  # a stage that `requires_approval` waits for an operator


class RolloutEvent(StrEnum):
    """What the controller observed or was asked; each one is a column of the table."""

    STARTED = "started"
    START_FAILED = "start_failed"
    PAUSE_REQUESTED = "pause_requested"
    RESUME_REQUESTED = "resume_requested"
    GATE_BREACH_PAUSE = "gate_breach_pause"
    GATE_BREACH_ABORT = "gate_breach_abort"
    STAGE_ADVANCED = "stage_advanced"
    LAST_STAGE_DONE = "last_stage_done"
    ABORT_REQUESTED = "abort_requested"
    ROLLBACK_REQUESTED = "rollback_requested"
    REVERT_FINISHED = "revert_finished"
    ROLLBACK_FINISHED = "rollback_finished"
    CANCEL_REQUESTED = "cancel_requested"
    APPROVAL_REQUIRED = "approval_required"
    APPROVED = "approved"
    APPROVAL_TIMEOUT_PAUSE = "approval_timeout_pause"
    APPROVAL_TIMEOUT_ABORT = "approval_timeout_abort"


class Desired(StrEnum):
    """The operator's intent (`desired` column, written by the API)."""

    RUN = "run"
    PAUSE = "pause"
    ABORT = "abort"


class Command(StrEnum):
    """Operator commands queued in `rollout_commands` (beyond the `desired` intent)."""

    PROMOTE = "promote"
    ROLLBACK = "rollback"
    CANCEL = "cancel"
    APPROVE = "approve"


S, E = RolloutState, RolloutEvent

#: The whole rollout lifecycle. A pair not in this table is a bug (`transition` raises).
TRANSITIONS: Mapping[tuple[RolloutState, RolloutEvent], RolloutState] = MappingProxyType(
    {
        # recorded by the API; the controller resolves the bundle and snapshots the cohort
        (S.PENDING, E.STARTED): S.RUNNING,
        (S.PENDING, E.START_FAILED): S.FAILED,  # no bundle, invalid plan or selector
        (S.PENDING, E.ABORT_REQUESTED): S.ABORTED,  # nothing was sent: nothing to revert
        (S.PENDING, E.CANCEL_REQUESTED): S.CANCELLED,
        # assigning the current stage, judging outcomes and gates
        (S.RUNNING, E.PAUSE_REQUESTED): S.PAUSED,
        (S.RUNNING, E.GATE_BREACH_PAUSE): S.PAUSED,
        (S.RUNNING, E.STAGE_ADVANCED): S.RUNNING,  # baked (or promoted): the next stage
        (S.RUNNING, E.LAST_STAGE_DONE): S.COMPLETED,
        (S.RUNNING, E.GATE_BREACH_ABORT): S.ROLLING_BACK,
        (S.RUNNING, E.ABORT_REQUESTED): S.ROLLING_BACK,
        (S.RUNNING, E.ROLLBACK_REQUESTED): S.ROLLING_BACK,
        (S.RUNNING, E.CANCEL_REQUESTED): S.CANCELLED,
        # no new assignments; devices in flight still get outcomes and timeouts
        (S.PAUSED, E.RESUME_REQUESTED): S.RUNNING,  # acknowledges this stage's gate breaches
        (S.PAUSED, E.STAGE_ADVANCED): S.PAUSED,  # promoted while paused: stays paused
        (S.PAUSED, E.ABORT_REQUESTED): S.ROLLING_BACK,
        (S.PAUSED, E.ROLLBACK_REQUESTED): S.ROLLING_BACK,
        (S.PAUSED, E.CANCEL_REQUESTED): S.CANCELLED,
        # every assigned device is sent back to the bundle it ran before; how the phase ends
        # depends on how it began (`REVERT_END`): an abort ends aborted, a rollback rolled back
        (S.ROLLING_BACK, E.REVERT_FINISHED): S.ABORTED,
        (S.ROLLING_BACK, E.ROLLBACK_FINISHED): S.ROLLED_BACK,
        (S.ROLLING_BACK, E.CANCEL_REQUESTED): S.CANCELLED,
        # finished, but a `rollback` command reopens it
        (S.COMPLETED, E.ROLLBACK_REQUESTED): S.ROLLING_BACK,
        (S.COMPLETED, E.CANCEL_REQUESTED): S.CANCELLED,  # a cancel queued as the last stage ended
        # approval gates (fleet/rollouts/approval.py): the stage starts only once approved
        (S.RUNNING, E.APPROVAL_REQUIRED): S.AWAITING_APPROVAL,
        (S.AWAITING_APPROVAL, E.APPROVED): S.RUNNING,
        (S.AWAITING_APPROVAL, E.APPROVAL_TIMEOUT_PAUSE): S.PAUSED,  # approve, then resume
        (S.AWAITING_APPROVAL, E.APPROVAL_TIMEOUT_ABORT): S.ROLLING_BACK,
        (S.AWAITING_APPROVAL, E.PAUSE_REQUESTED): S.PAUSED,
        (S.AWAITING_APPROVAL, E.GATE_BREACH_PAUSE): S.PAUSED,  # earlier stages' metrics still count
        (S.AWAITING_APPROVAL, E.GATE_BREACH_ABORT): S.ROLLING_BACK,
        (S.AWAITING_APPROVAL, E.ABORT_REQUESTED): S.ROLLING_BACK,
        (S.AWAITING_APPROVAL, E.ROLLBACK_REQUESTED): S.ROLLING_BACK,
        (S.AWAITING_APPROVAL, E.CANCEL_REQUESTED): S.CANCELLED,
    }
)

#: The event that ends the rollback phase, by the event that entered it. Why not one state per
#: cause: both phases do the same work (devices go back), only the record they end with differs;
#: the controller persists the end state on entry (`rollout_runtime.final_state`), so a restart
#: mid-revert still ends the way it began.
REVERT_END: Mapping[RolloutEvent, RolloutEvent] = MappingProxyType({
    E.GATE_BREACH_ABORT: E.REVERT_FINISHED,
    E.ABORT_REQUESTED: E.REVERT_FINISHED,
    E.APPROVAL_TIMEOUT_ABORT: E.REVERT_FINISHED,  # nobody approved in time: an abort
    E.ROLLBACK_REQUESTED: E.ROLLBACK_FINISHED,
})

INITIAL_STATE = S.PENDING
#: No way out: the controller never looks at these rollouts again.
TERMINAL_STATES: frozenset[RolloutState] = frozenset({S.ABORTED, S.ROLLED_BACK, S.FAILED, S.CANCELLED})
#: The rollout acts no more by itself; the API refuses intent (only `rollback` of a completed one).
FINISHED_STATES: frozenset[RolloutState] = TERMINAL_STATES | {S.COMPLETED}


def transition(state: RolloutState, event: RolloutEvent) -> RolloutState:
    """Look up the table. Raises `FleetMisuseError` for a pair the table does not allow."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise FleetMisuseError(f"no rollout transition from {state.value!r} on {event.value!r}") from None


def run_events(state: RolloutState, events: Iterable[RolloutEvent]) -> RolloutState:
    """Apply `events` in order through `transition` (a decision may fire two at once)."""
    for event in events:
        state = transition(state, event)
    return state


# -- decisions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueuedCommand:
    """A queued command: its row id (to mark it done), who queued it and why (for the note)."""

    id: int
    actor: str
    note: str = ""


@dataclass(frozen=True)
class RolloutSnapshot:
    """What the decisions read of one rollout, built by the controller from its records."""

    state: RolloutState
    desired: Desired
    stage: int
    started: bool  # the controller has a runtime record (it resolved the bundle and the cohort)
    commands: Mapping[Command, QueuedCommand] = field(default_factory=dict)
    can_publish: bool = True  # a publisher is wired; without one nothing new starts


class Work(StrEnum):
    """What the controller does for a rollout after persisting the decision's events."""

    NOTHING = "nothing"
    BEGIN = "begin"  # resolve the bundle and the cohort; fires STARTED or START_FAILED
    FORWARD = "forward"  # observe devices, evaluate gates, assign, judge the stage
    REVERT = "revert"  # send assigned devices back and watch them return


@dataclass(frozen=True)
class Decision:
    """Events to persist (one state change), then the work; `consumes` marks a command done."""

    events: tuple[RolloutEvent, ...] = ()
    work: Work = Work.NOTHING
    note: str = ""
    stage: int | None = None  # the stage after the change (None: unchanged)
    consumes: QueuedCommand | None = None  # marked done with the state change
    acknowledge_breach: bool = False  # resuming acknowledges this stage's gate breach


def decide_intent(s: RolloutSnapshot) -> Decision:
    """The operator's intent first: cancel, start, abort or rollback, else drive the phase."""
    cancel = s.commands.get(Command.CANCEL)
    if cancel is not None:
        return Decision((E.CANCEL_REQUESTED,), note=f"cancelled by {cancel.actor}: {cancel.note}",
                        consumes=cancel)
    if not s.started:
        if s.desired is Desired.ABORT:
            return Decision((E.ABORT_REQUESTED,), note="aborted before it started")
        # without a publisher it could assign no one, so it stays pending
        return Decision(work=Work.BEGIN if s.can_publish else Work.NOTHING)
    if s.state is S.PENDING:  # began before a restart cut the state write: record the start
        return Decision(work=Work.BEGIN)
    if s.state is S.ROLLING_BACK:
        return Decision(work=Work.REVERT)
    rollback = s.commands.get(Command.ROLLBACK)
    if s.state is S.COMPLETED:
        if rollback is None:
            return Decision()
        return Decision((E.ROLLBACK_REQUESTED,), note=f"rollback by {rollback.actor}: {rollback.note}",
                        consumes=rollback)
    if rollback is not None:
        return Decision((E.ROLLBACK_REQUESTED,), note=f"rollback by {rollback.actor}: {rollback.note}",
                        consumes=rollback)
    if s.desired is Desired.ABORT:
        return Decision((E.ABORT_REQUESTED,), note="abort by operator")
    return Decision(work=Work.FORWARD)


def decide_operator(s: RolloutSnapshot, cfg: StrategyConfig) -> Decision:
    """After the devices were observed: promote, pause or resume (`FORWARD` = carry on).

    A promote before the last stage moves on at once (a rollout asked to pause pauses on the
    next stage, one state change); the last stage's promote waits for `judge_stage`.
    """
    promote = s.commands.get(Command.PROMOTE)
    pausing = s.desired is Desired.PAUSE and s.state in (S.RUNNING, S.AWAITING_APPROVAL)
    awaiting = s.state is S.AWAITING_APPROVAL  # a promote waits for the approval (never skips one)
    if promote is not None and s.stage < stage_count(cfg) - 1 and not awaiting:
        events = (E.PAUSE_REQUESTED, E.STAGE_ADVANCED) if pausing else (E.STAGE_ADVANCED,)
        return Decision(events, note=f"promoted by {promote.actor}", stage=s.stage + 1, consumes=promote)
    if s.desired is Desired.PAUSE:
        return Decision((E.PAUSE_REQUESTED,) if pausing else (), note="paused by operator")
    if s.state is S.PAUSED:
        return Decision((E.RESUME_REQUESTED,), Work.FORWARD, note="resumed", acknowledge_breach=True)
    return Decision(work=Work.FORWARD)


def breach_event(cfg: StrategyConfig) -> RolloutEvent:
    """What a crossed gate does: the strategy's `on_breach`."""
    return E.GATE_BREACH_ABORT if cfg.on_breach == "abort" else E.GATE_BREACH_PAUSE


@dataclass(frozen=True)
class StageVerdict:
    """When the stage's last device finished (the bake clock) and whether it moves on."""

    done_at: float | None  # None while some device of the stage has no outcome
    decision: Decision = field(default_factory=Decision)


def judge_stage(s: RolloutSnapshot, cfg: StrategyConfig, stage_done: bool, done_at: float | None,
                now: float, counts: OutcomeCounts) -> StageVerdict:
    """Advance (or complete after the last stage) once the stage is done and has baked.

    `stage_done`: every device of the stage was assigned and has an outcome; `done_at`: when
    that was first seen (None if not yet); a queued `promote` skips the bake.
    """
    if not stage_done:
        return StageVerdict(None)
    done_at = now if done_at is None else done_at
    promote = s.commands.get(Command.PROMOTE)
    if promote is None and not stage_ready_to_advance(cfg, now, done_at):
        return StageVerdict(done_at)
    if s.stage >= stage_count(cfg) - 1:
        note = f"{counts.succeeded} succeeded, {counts.finished - counts.succeeded} failed"
        return StageVerdict(done_at, Decision((E.LAST_STAGE_DONE,), note=note, consumes=promote))
    note = f"stage {s.stage} baked {cfg.bake_s:.0f}s, gates clear"
    advance = Decision((E.STAGE_ADVANCED,), note=note, stage=s.stage + 1, consumes=promote)
    return StageVerdict(done_at, advance)


def revert_final_state(events: Iterable[RolloutEvent]) -> RolloutState | None:
    """Where a rollback phase entered by `events` ends (`REVERT_END`); None when they do not
    enter one (the controller stores it on entry)."""
    end = None
    for event in events:
        end = REVERT_END.get(event, end)
    return None if end is None else transition(S.ROLLING_BACK, end)


def decide_revert_end(outcomes: Iterable[str | None], final_state: str | None = None) -> Decision:
    """The rollback phase ends once every device is back, failed to return, or was skipped, in
    the state recorded when it began (`final_state`; a phase recorded before rollbacks had a
    state of their own has none and ends `aborted`, as it would have then)."""
    seen = list(outcomes)
    if not all(o in ("reverted", "revert_failed", "skipped") for o in seen):
        return Decision()
    note = (f"{seen.count('reverted')} devices back on their previous bundle, "
            f"{seen.count('revert_failed')} failed to return")
    ends = [e for (src, e), dst in TRANSITIONS.items() if src is S.ROLLING_BACK and dst.value == final_state]
    return Decision((ends[0] if ends else E.REVERT_FINISHED,), note=note)


# -- docs -----------------------------------------------------------------------------------------
REGENERATE = 'python -c "from fleet.rollouts.machine import render_docs; print(render_docs())"'


def render_table() -> str:
    """`TRANSITIONS` as a Markdown table (docs/rollouts.md embeds it; a test keeps it current)."""
    lines = ["| from | event | to |", "|---|---|---|"]
    lines += [f"| `{s.value}` | `{e.value}` | `{d.value}` |" for (s, e), d in TRANSITIONS.items()]
    return "\n".join(lines)


def render_mermaid() -> str:
    """`TRANSITIONS` as a Mermaid state diagram (events on the same edge are merged)."""
    edges: dict[tuple[RolloutState, RolloutState], list[str]] = {}
    for (src, ev), dst in TRANSITIONS.items():
        edges.setdefault((src, dst), []).append(ev.value)
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL_STATE.value}"]
    lines += [f"    {s.value} --> {d.value}: {', '.join(evs)}" for (s, d), evs in edges.items()]
    lines += [f"    {s.value} --> [*]" for s in RolloutState if s in TERMINAL_STATES]
    return "\n".join(lines)


def render_docs() -> str:
    """The block docs/rollouts.md shows under "The lifecycle table": the diagram, then the table."""
    return f"```mermaid\n{render_mermaid()}\n```\n\n{render_table()}"
