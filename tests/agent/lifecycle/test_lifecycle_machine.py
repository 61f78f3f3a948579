"""The transition table and the driver: reachability, ways back, misuse, loop counters."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import MisuseError
from agent.lifecycle.install import HANDLERS
from agent.lifecycle.machine import (
    LOOP_GUARDED,
    STABLE_STATES,
    TRANSITIONS,
    Event,
    LoopLimits,
    Machine,
    State,
    safe_state,
    transition,
)
from agent.lifecycle.state_store import StateRecord, StateStore
from tests.support.state_graph import graph, reachable


def _graph() -> dict[State, set[State]]:
    return graph(State, TRANSITIONS)


@pytest.mark.unit
def test_every_state_is_reachable_from_idle() -> None:
    assert reachable(State.IDLE, _graph()) == set(State)


@pytest.mark.unit
def test_every_state_has_a_way_back_to_serving_and_no_dead_ends() -> None:
    g = _graph()
    for state in State:
        assert g[state], f"{state} is a dead end"
        assert State.IDLE in reachable(state, g), f"{state} cannot get back to idle"


@pytest.mark.unit
def test_every_unstable_state_says_what_a_crash_or_a_loop_means() -> None:
    for state in set(State) - STABLE_STATES:
        assert (state, Event.CRASH_RECOVERED) in TRANSITIONS, state
        assert (state, Event.LOOP_DETECTED) in TRANSITIONS, state
    # a loop never leads further into an update
    for state in set(State) - STABLE_STATES:
        assert TRANSITIONS[(state, Event.LOOP_DETECTED)] in {State.ROLLING_BACK, State.FAILED, State.IDLE}
    # a crash during probation is blamed on the new model
    assert TRANSITIONS[(State.PROBATION, Event.CRASH_RECOVERED)] is State.ROLLING_BACK


@pytest.mark.unit
def test_failures_never_move_forward() -> None:
    forward = {State.VERIFYING, State.STAGED, State.ACTIVATING, State.PROBATION, State.COMMITTED}
    bad = {Event.VERIFY_FAILED, Event.LOAD_FAILED, Event.HEALTH_FAILED, Event.TIMEOUT}
    bad.add(Event.ROLLBACK_REQUESTED)
    for (_, event), dst in TRANSITIONS.items():
        if event in bad:
            assert dst not in forward


@pytest.mark.unit
def test_handlers_cover_every_state_and_events_are_all_used() -> None:
    assert set(HANDLERS) == set(State)
    assert {e for _, e in TRANSITIONS} == set(Event)


@pytest.mark.unit
def test_unknown_pair_is_misuse_and_safe_state_abandons_the_update() -> None:
    with pytest.raises(MisuseError, match="no transition from 'idle' on 'health_ok'"):
        transition(State.IDLE, Event.HEALTH_OK)
    assert safe_state(State.ACTIVATING) is State.ROLLING_BACK
    assert safe_state(State.ROLLING_BACK) is State.FAILED
    assert safe_state(State.FAILED) is State.IDLE
    assert safe_state(State.IDLE) is State.IDLE


class _Ctx:
    def __init__(self, record: StateRecord) -> None:
        self.record = record


def _machine(tmp_path: Path, script: dict[State, Event], record: StateRecord | None = None,
             limits: LoopLimits | None = None) -> tuple[Machine, list[tuple[State, str]]]:
    store = StateStore(tmp_path)
    ctx = _Ctx(record or StateRecord())
    seen: list[tuple[State, str]] = []

    def make(state: State):  # type: ignore[no-untyped-def]
        def handler(c: _Ctx) -> Event:
            # what is on disk when the handler runs: the record was saved before acting
            seen.append((state, store.load().state))
            return script[state]

        return handler

    return Machine(store, ctx, {s: make(s) for s in State}, limits), seen


@pytest.mark.integration
def test_driver_saves_before_each_action(tmp_path: Path) -> None:
    script = {s: Event.DONE for s in State} | {
        State.IDLE: Event.FOUND_ON_DISK, State.ACTIVATING: Event.GOLDEN_OK, State.PROBATION: Event.HEALTH_OK,
    }
    m, seen = _machine(tmp_path, script, StateRecord(candidate="b-1.0.0"))
    for _ in range(5):
        m.step()
    expected = [State.IDLE, State.STAGED, State.ACTIVATING, State.PROBATION, State.COMMITTED]
    assert [s for s, _ in seen] == expected
    assert all(s.value == on_disk for s, on_disk in seen)
    assert m.state is State.IDLE


@pytest.mark.integration
def test_bad_event_from_a_handler_forces_a_safe_state(tmp_path: Path) -> None:
    m, _ = _machine(tmp_path, {s: Event.HEALTH_OK for s in State}, StateRecord(state="staged"))
    assert m.step() is State.ROLLING_BACK
    assert m.record.last_error is not None and "no transition" in m.record.last_error


@pytest.mark.integration
def test_handler_exception_forces_a_safe_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    ctx = _Ctx(StateRecord(state="activating"))

    def boom(c: _Ctx) -> Event:
        raise ZeroDivisionError("bug")

    m = Machine(store, ctx, dict.fromkeys(State, boom))
    assert m.step() is State.ROLLING_BACK
    assert "ZeroDivisionError" in (m.record.last_error or "")


@pytest.mark.integration
def test_activation_loop_forces_rollback(tmp_path: Path) -> None:
    assert State.ACTIVATING in LOOP_GUARDED
    record = StateRecord(state="activating", candidate="b-2.0.0")
    m, seen = _machine(tmp_path, {State.ACTIVATING: Event.CRASH_RECOVERED}, record, LoopLimits(max_entries=3))
    # the handler "crashes" each time: simulate by re-entering via crash_recovered
    for _ in range(3):
        assert m.step() is State.ACTIVATING
    assert m.step() is State.ROLLING_BACK  # the 4th entry is refused
    assert len(seen) == 3 and m.record.attempts == {"activating:b-2.0.0": 4}


@pytest.mark.integration
def test_crash_loop_on_resume_forces_rollback(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(StateRecord(state="staged", candidate="b-2.0.0"))
    for restart in range(1, 5):
        m, _ = _machine(tmp_path, {}, store.load(), LoopLimits(max_crash_recoveries=3))
        state = m.resume()
        if restart <= 3:
            assert state is State.STAGED and m.record.crash_recoveries == restart
        else:
            assert state is State.ROLLING_BACK


@pytest.mark.integration
def test_machine_refuses_missing_handlers(tmp_path: Path) -> None:
    with pytest.raises(MisuseError, match="no handler"):
        Machine(StateStore(tmp_path), _Ctx(StateRecord()), {State.IDLE: lambda c: Event.NO_CHANGE})


@pytest.mark.integration
def test_run_until_stable_detects_a_table_that_never_settles(tmp_path: Path) -> None:
    script = {State.IDLE: Event.FOUND_ON_DISK, State.STAGED: Event.SUPERSEDED, State.FAILED: Event.DONE}
    m, _ = _machine(tmp_path, script, StateRecord(candidate=None))
    with pytest.raises(MisuseError, match="did not settle"):
        m.run_until_stable(max_steps=10)
