"""The training job lifecycle: one declarative transition table and pure decisions over it.

A job goes `queued -> waiting_data -> training -> building -> publishing` and ends
`succeeded` (a version registered and, by policy, a canary rollout created), `awaiting_approval`
(the version is registered; an operator approves the canary or rejects it), `failed` or
`cancelled`. The worker (`fleet.training.worker`) persists every state change before the work it
leads to, and decides from the stored record after a restart: a job found in `training` or
`building` (its subprocess died with the fleet) runs that step again from its inputs, up to
`max_attempts`, then fails; one found in `publishing` checks whether its version was already
registered (the registration and the state change share one transaction) and finishes or
publishes again. Nothing a failed job did is kept: the version is registered only in
`publishing`, after the gate passed, and in the same transaction as the state change.

Pure: no I/O; the clock is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from fleet.errors import FleetMisuseError


class JobState(StrEnum):
    QUEUED = "queued"
    WAITING_DATA = "waiting_data"  # the collected sample is not big enough yet
    TRAINING = "training"  # labelling, then the user's trainer in a subprocess
    BUILDING = "building"  # quantize, accuracy gate, profile, golden vectors
    PUBLISHING = "publishing"  # TUF target, version with lineage, rollout (one transaction)
    AWAITING_APPROVAL = "awaiting_approval"
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"  # the operator refused the canary; the version stays registered
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobEvent(StrEnum):
    STARTED = "started"
    DATA_READY = "data_ready"
    DATA_TIMEOUT = "data_timeout"
    TRAINED = "trained"
    TRAIN_FAILED = "train_failed"
    RETRY = "retry"  # resumed after a restart: the step runs again
    GATE_PASSED = "gate_passed"
    BUILD_FAILED = "build_failed"  # the pipeline refused the model, or the accuracy gate did
    PUBLISHED = "published"  # version registered and the canary created (policy: automatic)
    PUBLISHED_AWAITING = "published_awaiting"  # version registered, canary waits (policy: approval)
    PUBLISH_FAILED = "publish_failed"
    APPROVED = "approved"
    REJECTED = "rejected"
    CANCEL_REQUESTED = "cancel_requested"
    INTERRUPTED = "interrupted"  # restarted too often mid-step


S, E = JobState, JobEvent

TRANSITIONS: Mapping[tuple[JobState, JobEvent], JobState] = MappingProxyType({
    (S.QUEUED, E.STARTED): S.WAITING_DATA,
    (S.QUEUED, E.CANCEL_REQUESTED): S.CANCELLED,
    (S.WAITING_DATA, E.DATA_READY): S.TRAINING,
    (S.WAITING_DATA, E.DATA_TIMEOUT): S.FAILED,
    (S.WAITING_DATA, E.CANCEL_REQUESTED): S.CANCELLED,
    (S.TRAINING, E.TRAINED): S.BUILDING,
    (S.TRAINING, E.TRAIN_FAILED): S.FAILED,
    (S.TRAINING, E.RETRY): S.TRAINING,
    (S.TRAINING, E.INTERRUPTED): S.FAILED,
    (S.TRAINING, E.CANCEL_REQUESTED): S.CANCELLED,
    (S.BUILDING, E.GATE_PASSED): S.PUBLISHING,
    (S.BUILDING, E.BUILD_FAILED): S.FAILED,
    (S.BUILDING, E.RETRY): S.BUILDING,
    (S.BUILDING, E.INTERRUPTED): S.FAILED,
    (S.BUILDING, E.CANCEL_REQUESTED): S.CANCELLED,
    # no cancel while publishing: it is one transaction, and it finishes or fails as a whole
    (S.PUBLISHING, E.PUBLISHED): S.SUCCEEDED,
    (S.PUBLISHING, E.PUBLISHED_AWAITING): S.AWAITING_APPROVAL,
    (S.PUBLISHING, E.PUBLISH_FAILED): S.FAILED,
    (S.AWAITING_APPROVAL, E.APPROVED): S.SUCCEEDED,
    (S.AWAITING_APPROVAL, E.REJECTED): S.REJECTED,
})

INITIAL_STATE = S.QUEUED
TERMINAL_STATES: frozenset[JobState] = frozenset({S.SUCCEEDED, S.REJECTED, S.FAILED, S.CANCELLED})
#: Steps whose work dies with the process: a restart finds them half done and runs them again.
RESTARTABLE: frozenset[JobState] = frozenset({S.TRAINING, S.BUILDING})


def transition(state: JobState, event: JobEvent) -> JobState:
    """Look up the table. Raises `FleetMisuseError` for a pair it does not allow."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise FleetMisuseError(f"no training job transition from {state.value!r} "
                               f"on {event.value!r}") from None


class Work(StrEnum):
    NOTHING = "nothing"
    WAIT_DATA = "wait_data"  # count the collected rows; DATA_READY when enough
    TRAIN = "train"
    BUILD = "build"
    PUBLISH = "publish"
    ROLLOUT = "rollout"  # approved: create the canary now


@dataclass(frozen=True)
class JobSnapshot:
    """What the decisions read of one job (built by the worker from its row)."""

    state: JobState
    created_at: float
    attempts: int  # times the current step was started
    cancel_requested: bool = False
    approval: str | None = None  # "approved" / "rejected" once the operator decided
    resumed: bool = False  # first look at this job since this worker started


@dataclass(frozen=True)
class Decision:
    events: tuple[JobEvent, ...] = ()
    work: Work = Work.NOTHING
    note: str = ""


def decide(s: JobSnapshot, now: float, data_timeout_s: float, max_attempts: int) -> Decision:
    """The next event(s) to persist and the work to do after them."""
    if s.state in TERMINAL_STATES:
        return Decision()
    if s.cancel_requested and (s.state, E.CANCEL_REQUESTED) in TRANSITIONS:
        return Decision((E.CANCEL_REQUESTED,), note="cancelled by operator")
    if s.state is S.QUEUED:
        return Decision((E.STARTED,), Work.WAIT_DATA)
    if s.state is S.WAITING_DATA:
        if now - s.created_at > data_timeout_s:
            return Decision((E.DATA_TIMEOUT,),
                            note=f"not enough collected data within {data_timeout_s:.0f} s")
        return Decision(work=Work.WAIT_DATA)
    if s.state in RESTARTABLE:
        work = Work.TRAIN if s.state is S.TRAINING else Work.BUILD
        if s.attempts >= max_attempts:  # each start counts, so a step that kills its worker ends
            return Decision((E.INTERRUPTED,), note=f"{s.state.value} interrupted {s.attempts} times")
        if not s.resumed:
            return Decision(work=work)
        return Decision((E.RETRY,), work, note=f"{s.state.value} interrupted by a restart: running it again")
    if s.state is S.PUBLISHING:
        return Decision(work=Work.PUBLISH)
    if s.state is S.AWAITING_APPROVAL:
        if s.approval == "approved":
            return Decision(work=Work.ROLLOUT)
        if s.approval == "rejected":
            return Decision((E.REJECTED,), note="canary rejected by operator")
    return Decision()


# -- docs -----------------------------------------------------------------------------------------
def render_table() -> str:
    """`TRANSITIONS` as a Markdown table (docs/training.md embeds it; a test keeps it current)."""
    lines = ["| from | event | to |", "|---|---|---|"]
    lines += [f"| `{s.value}` | `{e.value}` | `{d.value}` |" for (s, e), d in TRANSITIONS.items()]
    return "\n".join(lines)
