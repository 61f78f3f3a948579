"""The install/activate/rollback state machine: one declarative table and a small driver.

Why a table: every legal move is visible in one place (and rendered in docs/lifecycle.md),
handlers stay small (each does its state's work and *returns* an event, never calls the
next state), and a test can walk the table to prove that every state is reachable and
every state has a way back to `idle` (serving the active bundle). The driver saves the
state record before running a state's action (Mender's `SaveState`), so a crash at any
point resumes by re-running an idempotent handler or, where the table says so, by
rolling back. Loop counters turn a crash loop or an activation loop into a rollback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

from agent.errors import MisuseError
from agent.lifecycle.state_store import StateRecord, StateStore
from agent.logs import log_event

log = logging.getLogger(__name__)


class State(StrEnum):
    """Where the lifecycle is. `idle` is the only stable state (serving `active`, if any)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    ACTIVATING = "activating"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"


class Event(StrEnum):
    """What a handler (or the driver) observed."""

    NO_CHANGE = "no_change"
    DESIRED_CHANGED = "desired_changed"
    FOUND_ON_DISK = "found_on_disk"
    DOWNLOADED = "downloaded"
    DOWNLOAD_FAILED = "download_failed"
    VERIFIED = "verified"
    VERIFY_FAILED = "verify_failed"
    SUPERSEDED = "superseded"
    LOAD_FAILED = "load_failed"
    GOLDEN_OK = "golden_ok"
    HEALTH_OK = "health_ok"
    HEALTH_FAILED = "health_failed"
    TIMEOUT = "timeout"
    CRASH_RECOVERED = "crash_recovered"
    ROLLBACK_REQUESTED = "rollback_requested"
    LOOP_DETECTED = "loop_detected"
    DONE = "done"
    HOLD = "hold"  # the update waits here (window, resources): see agent/lifecycle/holds.py


S, E = State, Event

#: The whole lifecycle. Anything not in this table is a bug (see `Machine.step`).
TRANSITIONS: Mapping[tuple[State, Event], State] = MappingProxyType(
    {
        # stable: serve `active`; look at the desired target
        (S.IDLE, E.NO_CHANGE): S.IDLE,
        (S.IDLE, E.DESIRED_CHANGED): S.DOWNLOADING,
        (S.IDLE, E.FOUND_ON_DISK): S.STAGED,  # e.g. operator rollback to `previous`
        (S.IDLE, E.LOAD_FAILED): S.ROLLING_BACK,  # active no longer loads after a restart
        # download the target through the trust client (TUF verifies length + hash)
        (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
        (S.DOWNLOADING, E.DOWNLOAD_FAILED): S.FAILED,  # transport: retried with backoff
        (S.DOWNLOADING, E.VERIFY_FAILED): S.ROLLING_BACK,  # untrusted: quarantine
        (S.DOWNLOADING, E.SUPERSEDED): S.FAILED,
        (S.DOWNLOADING, E.CRASH_RECOVERED): S.DOWNLOADING,
        (S.DOWNLOADING, E.LOOP_DETECTED): S.ROLLING_BACK,
        # extract + validate into bundles/<id>/
        (S.VERIFYING, E.VERIFIED): S.STAGED,
        (S.VERIFYING, E.VERIFY_FAILED): S.ROLLING_BACK,
        (S.VERIFYING, E.DOWNLOAD_FAILED): S.FAILED,  # the downloaded file vanished: fetch again
        (S.VERIFYING, E.CRASH_RECOVERED): S.VERIFYING,
        (S.VERIFYING, E.LOOP_DETECTED): S.ROLLING_BACK,
        # on disk and verified; waiting to activate
        (S.STAGED, E.DONE): S.ACTIVATING,
        (S.STAGED, E.SUPERSEDED): S.FAILED,  # a newer desired target arrived meanwhile
        (S.STAGED, E.CRASH_RECOVERED): S.STAGED,
        (S.STAGED, E.LOOP_DETECTED): S.ROLLING_BACK,
        (S.STAGED, E.HOLD): S.STAGED,  # outside the activation window, or short of resources
        # load + warm beside the old model, golden vectors, swap
        (S.ACTIVATING, E.GOLDEN_OK): S.PROBATION,
        (S.ACTIVATING, E.LOAD_FAILED): S.ROLLING_BACK,
        (S.ACTIVATING, E.HEALTH_FAILED): S.ROLLING_BACK,
        (S.ACTIVATING, E.TIMEOUT): S.ROLLING_BACK,
        (S.ACTIVATING, E.CRASH_RECOVERED): S.ACTIVATING,  # retried; the loop counter bounds it
        (S.ACTIVATING, E.LOOP_DETECTED): S.ROLLING_BACK,
        # serving the new model under watch
        (S.PROBATION, E.HEALTH_OK): S.COMMITTED,
        (S.PROBATION, E.HEALTH_FAILED): S.ROLLING_BACK,
        (S.PROBATION, E.TIMEOUT): S.ROLLING_BACK,
        (S.PROBATION, E.ROLLBACK_REQUESTED): S.ROLLING_BACK,
        (S.PROBATION, E.SUPERSEDED): S.ROLLING_BACK,  # a newer order names another bundle
        (S.PROBATION, E.CRASH_RECOVERED): S.ROLLING_BACK,  # the new model may be what crashed us
        (S.PROBATION, E.LOOP_DETECTED): S.ROLLING_BACK,
        # make it permanent
        (S.COMMITTED, E.DONE): S.IDLE,
        (S.COMMITTED, E.CRASH_RECOVERED): S.COMMITTED,
        (S.COMMITTED, E.LOOP_DETECTED): S.FAILED,
        # back to the previous slot, quarantine the candidate
        (S.ROLLING_BACK, E.DONE): S.IDLE,
        (S.ROLLING_BACK, E.LOAD_FAILED): S.FAILED,  # the previous model does not load either
        (S.ROLLING_BACK, E.CRASH_RECOVERED): S.ROLLING_BACK,
        (S.ROLLING_BACK, E.LOOP_DETECTED): S.FAILED,
        # record the error, clean up, back to stable
        (S.FAILED, E.DONE): S.IDLE,
        (S.FAILED, E.CRASH_RECOVERED): S.FAILED,
        (S.FAILED, E.LOOP_DETECTED): S.IDLE,
    }
)

STABLE_STATES: frozenset[State] = frozenset({S.IDLE})
#: States whose entries are counted per candidate bundle; past the limit -> LOOP_DETECTED.
LOOP_GUARDED: frozenset[State] = frozenset(set(State) - {S.IDLE, S.DOWNLOADING})


def safe_state(state: State) -> State:
    """Where an impossible (state, event) pair lands: abandon the update, keep serving."""
    if state in (S.IDLE,):
        return S.IDLE
    if state is S.ROLLING_BACK:
        return S.FAILED
    if state is S.FAILED:
        return S.IDLE
    return S.ROLLING_BACK


def transition(state: State, event: Event) -> State:
    """Look up the table. Raises `MisuseError` for a pair the table does not allow."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise MisuseError(f"no transition from {state.value!r} on {event.value!r}") from None


class HasRecord(Protocol):
    """What the driver needs from the handlers' context."""

    record: StateRecord


Handler = Callable[[HasRecord], Event]


@dataclass(frozen=True)
class LoopLimits:
    """How many times the same state may be entered for one bundle, and restarts in a row."""

    max_entries: int = 3
    max_crash_recoveries: int = 3


class Machine:
    """Drives `TRANSITIONS` with one handler per state; persists before every action."""

    def __init__(
        self,
        store: StateStore,
        ctx: HasRecord,
        handlers: Mapping[State, Handler],
        limits: LoopLimits | None = None,
    ) -> None:
        missing = set(State) - set(handlers)
        if missing:
            raise MisuseError(f"no handler for states: {sorted(s.value for s in missing)}")
        self.store = store
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.limits = limits or LoopLimits()
        self._saved: bytes | None = None

    @property
    def record(self) -> StateRecord:
        return self.ctx.record

    @property
    def state(self) -> State:
        return State(self.record.state)

    def _persist(self) -> None:
        fingerprint = self.record.fingerprint()
        if fingerprint != self._saved:
            self.store.save(self.record)
            self._saved = fingerprint

    def _move(self, state: State, event: Event) -> State:
        try:
            nxt = transition(state, event)
        except MisuseError as exc:
            nxt = safe_state(state)
            log_event(log, "lifecycle.bad_transition", logging.ERROR, error=str(exc), forced=nxt.value)
            self.record.last_error = f"internal: {exc}"
        log_event(log, "lifecycle.transition", src=state.value, ev=event.value, dst=nxt.value,
                  bundle=self.record.candidate or self.record.active)
        if nxt is S.IDLE:
            self.record.crash_recoveries = 0
        if nxt is not state and event is not E.HOLD:
            self.record.hold = None  # a hold lasts while the machine rests where it was set
        self.record.state = nxt.value
        return nxt

    def resume(self) -> State:
        """Call once at start: a record outside `idle` means we crashed mid-update."""
        state = self.state
        if state in STABLE_STATES or self.record.hold:  # a held update was resting, not working
            return state
        self.record.crash_recoveries += 1
        event = (
            E.LOOP_DETECTED
            if self.record.crash_recoveries > self.limits.max_crash_recoveries
            else E.CRASH_RECOVERED
        )
        log_event(log, "lifecycle.resume", logging.WARNING, state=state.value, ev=event.value,
                  crash_recoveries=self.record.crash_recoveries)
        nxt = self._move(state, event)
        self._persist()
        return nxt

    def step(self) -> State:
        """Save, run the current state's handler, apply the table. Returns the new state."""
        state = self.state
        if state in LOOP_GUARDED and not self.record.hold:  # a resting hold is one entry
            key = f"{state.value}:{self.record.candidate}"
            self.record.attempts[key] = self.record.attempts.get(key, 0) + 1
            if self.record.attempts[key] > self.limits.max_entries:
                log_event(log, "lifecycle.loop", logging.WARNING, key=key, entries=self.record.attempts[key])
                self._persist()
                return self._move(state, E.LOOP_DETECTED)
        self._persist()  # SaveState before acting
        try:
            event = self.handlers[state](self.ctx)
        except Exception as exc:  # a handler bug must not wedge the device
            log.exception("lifecycle handler for %s raised", state.value)
            self.record.last_error = f"internal: {type(exc).__name__}: {exc}"
            nxt = safe_state(state)
            self.record.state = nxt.value
            return nxt
        if not isinstance(event, Event):
            log_event(log, "lifecycle.bad_event", logging.ERROR, state=state.value, ev=repr(event))
            nxt = safe_state(state)
            self.record.state = nxt.value
            return nxt
        return self._move(state, event)

    def run_until_stable(self, max_steps: int = 64) -> State:
        """Step until the machine rests in a stable state with nothing to do.

        Raises `MisuseError` if it does not settle within `max_steps` (a table bug).
        """
        for _ in range(max_steps):
            before = self.state
            after = self.step()
            if (after in STABLE_STATES and before in STABLE_STATES) or (after is before and self.record.hold):
                self._persist()
                return after
        raise MisuseError(f"lifecycle did not settle in {max_steps} steps (state {self.state.value})")


def render_table() -> str:
    """`TRANSITIONS` as a Markdown table (docs/lifecycle.md embeds it; a test keeps it current)."""
    lines = ["| from | event | to |", "|---|---|---|"]
    lines += [f"| `{s.value}` | `{e.value}` | `{d.value}` |" for (s, e), d in TRANSITIONS.items()]
    return "\n".join(lines)


def render_mermaid() -> str:
    """`TRANSITIONS` as a Mermaid state diagram (events on the same edge are merged)."""
    edges: dict[tuple[State, State], list[str]] = {}
    for (src, ev), dst in TRANSITIONS.items():
        edges.setdefault((src, dst), []).append(ev.value)
    lines = ["stateDiagram-v2", "    [*] --> idle"]
    lines += [f"    {s.value} --> {d.value}: {', '.join(evs)}" for (s, d), evs in edges.items()]
    return "\n".join(lines)

