"""The rollout transition table and its pure decisions; the controller changes state only through it.

The unit tests walk the table (reachability, a way to an end, terminal states, misuse) and
call the decisions with hand-made snapshots and an injected clock. The integration test
drives the real controller (tests/support/rollout_world.py) through scenarios that fire
every pair of the table and checks that each state change it wrote went through the table.
"""

from __future__ import annotations

import pytest

from fleet.cli.rollouts import STATES as CLI_STATES
from fleet.errors import FleetMisuseError
from fleet.rollouts.gates import OutcomeCounts, VersionMetrics
from fleet.rollouts.machine import (
    FINISHED_STATES,
    INITIAL_STATE,
    REVERT_END,
    TERMINAL_STATES,
    TRANSITIONS,
    Command,
    Desired,
    QueuedCommand,
    RolloutEvent,
    RolloutSnapshot,
    RolloutState,
    Work,
    breach_event,
    decide_intent,
    decide_operator,
    decide_revert_end,
    judge_stage,
    revert_final_state,
    run_events,
    transition,
)
from fleet.rollouts.records import RolloutRecords
from fleet.rollouts.store import FINISHED_STATES as STORE_FINISHED
from fleet.rollouts.store import STATES
from fleet.rollouts.strategies import StrategyConfig
from tests.support.fakes import DIGEST
from tests.support.rollout_world import V1, Run, World
from tests.support.rollout_world import world as world  # the fixture
from tests.support.state_graph import graph, reachable

S, E = RolloutState, RolloutEvent
CANARY = StrategyConfig.parse({"kind": "canary", "stages": [25, 50, 100], "bake_s": 60})


def _graph() -> dict[RolloutState, set[RolloutState]]:
    return graph(RolloutState, TRANSITIONS)


@pytest.mark.unit
def test_every_state_is_reachable_from_pending() -> None:
    assert INITIAL_STATE is S.PENDING
    assert reachable(S.PENDING, _graph()) == set(RolloutState)


@pytest.mark.unit
def test_every_unfinished_state_has_a_path_to_a_terminal_state() -> None:
    g = _graph()
    for state in set(RolloutState) - TERMINAL_STATES:
        assert g[state], f"{state} is a dead end"
        assert reachable(state, g) & TERMINAL_STATES, f"{state} can never end"


@pytest.mark.unit
def test_terminal_states_have_no_transitions_and_the_store_agrees() -> None:
    assert {S.ABORTED, S.ROLLED_BACK, S.FAILED, S.CANCELLED} == TERMINAL_STATES
    assert all(src not in TERMINAL_STATES for src, _ in TRANSITIONS)
    assert TERMINAL_STATES | {S.COMPLETED} == FINISHED_STATES
    # what the API and the metrics call states and finished states is the machine's
    assert STATES == ("pending", "running", "paused", "rolling_back", "completed", "aborted", "rolled_back",
                      "failed", "cancelled", "awaiting_approval")
    assert set(STORE_FINISHED) == {s.value for s in FINISHED_STATES}
    assert CLI_STATES == STATES  # `rollouts list --state` offers exactly these


@pytest.mark.unit
def test_every_event_is_used_and_failures_never_lead_forward() -> None:
    assert {e for _, e in TRANSITIONS} == set(RolloutEvent)
    stopping = {E.ABORT_REQUESTED, E.ROLLBACK_REQUESTED, E.GATE_BREACH_ABORT, E.CANCEL_REQUESTED}
    for (_, event), dst in TRANSITIONS.items():
        if event in stopping:
            assert dst in {S.ROLLING_BACK, S.ABORTED, S.CANCELLED}, (event, dst)
    assert {dst for (_, e), dst in TRANSITIONS.items() if e is E.GATE_BREACH_PAUSE} == {S.PAUSED}


@pytest.mark.unit
def test_an_undefined_pair_raises_and_nothing_moves() -> None:
    with pytest.raises(FleetMisuseError, match="no rollout transition from 'completed' on 'stage_advanced'"):
        transition(S.COMPLETED, E.STAGE_ADVANCED)
    with pytest.raises(FleetMisuseError, match="from 'aborted' on 'cancel_requested'"):
        transition(S.ABORTED, E.CANCEL_REQUESTED)
    with pytest.raises(FleetMisuseError, match="from 'running' on 'revert_finished'"):
        run_events(S.PAUSED, [E.RESUME_REQUESTED, E.REVERT_FINISHED])
    assert run_events(S.RUNNING, [E.PAUSE_REQUESTED, E.STAGE_ADVANCED]) is S.PAUSED
    assert run_events(S.PAUSED, []) is S.PAUSED


def _snap(state: RolloutState = S.RUNNING, desired: Desired = Desired.RUN, stage: int = 0,
          started: bool = True, can_publish: bool = True, **commands: QueuedCommand) -> RolloutSnapshot:
    return RolloutSnapshot(state, desired, stage, started, {Command(k): v for k, v in commands.items()},
                           can_publish)


OP = QueuedCommand(7, "op", "why")


@pytest.mark.unit
def test_intent_cancel_first_then_start_abort_rollback_or_the_phase() -> None:
    cancel = decide_intent(_snap(S.ROLLING_BACK, Desired.ABORT, cancel=OP, rollback=OP))
    assert (cancel.events, cancel.consumes) == ((E.CANCEL_REQUESTED,), OP)
    assert cancel.note == "cancelled by op: why"
    early = decide_intent(_snap(S.PENDING, Desired.ABORT, started=False))
    assert (early.events, early.note) == ((E.ABORT_REQUESTED,), "aborted before it started")
    assert decide_intent(_snap(S.PENDING, started=False)).work is Work.BEGIN
    assert decide_intent(_snap(S.PENDING, started=False, can_publish=False)) == decide_intent(
        _snap(S.COMPLETED))  # nothing to do: stays pending / stays completed
    assert decide_intent(_snap(S.PENDING)).work is Work.BEGIN  # a start a restart cut short
    assert decide_intent(_snap(S.ROLLING_BACK, rollback=OP)).work is Work.REVERT
    reopen = decide_intent(_snap(S.COMPLETED, rollback=OP))
    assert (reopen.events, reopen.consumes) == ((E.ROLLBACK_REQUESTED,), OP)
    assert reopen.note == "rollback by op: why"
    assert decide_intent(_snap(S.PAUSED, Desired.ABORT)).events == (E.ABORT_REQUESTED,)
    both = decide_intent(_snap(S.RUNNING, Desired.ABORT, rollback=OP))
    assert (both.events, both.consumes, both.note) == ((E.ROLLBACK_REQUESTED,), OP, "rollback by op: why")
    assert decide_intent(_snap(S.PAUSED, Desired.PAUSE, promote=OP)).work is Work.FORWARD


@pytest.mark.unit
def test_operator_promote_pause_and_resume() -> None:
    promote = decide_operator(_snap(stage=0, promote=OP), CANARY)
    assert (promote.events, promote.stage, promote.consumes, promote.work) == (
        (E.STAGE_ADVANCED,), 1, OP, Work.NOTHING)
    # asked to pause, then promoted before the controller acted: one change, to the next stage, paused
    pausing = decide_operator(_snap(desired=Desired.PAUSE, stage=1, promote=OP), CANARY)
    assert run_events(S.RUNNING, pausing.events) is S.PAUSED and pausing.stage == 2
    assert decide_operator(_snap(S.PAUSED, Desired.PAUSE, stage=0, promote=OP), CANARY).events == (
        E.STAGE_ADVANCED,)
    # the last stage's promote waits for the stage verdict; a pause holds it back
    last = decide_operator(_snap(stage=2, promote=OP), CANARY)
    assert (last.events, last.work, last.consumes) == ((), Work.FORWARD, None)
    assert decide_operator(_snap(desired=Desired.PAUSE), CANARY).events == (E.PAUSE_REQUESTED,)
    held = decide_operator(_snap(S.PAUSED, Desired.PAUSE, stage=2, promote=OP), CANARY)
    assert (held.events, held.work) == ((), Work.NOTHING)
    resume = decide_operator(_snap(S.PAUSED), CANARY)
    assert (resume.events, resume.work, resume.acknowledge_breach) == (
        (E.RESUME_REQUESTED,), Work.FORWARD, True)
    assert breach_event(CANARY) is E.GATE_BREACH_PAUSE
    assert breach_event(StrategyConfig.parse({"on_breach": "abort"})) is E.GATE_BREACH_ABORT


@pytest.mark.unit
def test_stage_verdict_bakes_on_the_injected_clock() -> None:
    counts = OutcomeCounts(assigned=4, succeeded=3, install_failed=1)
    snap = _snap(stage=0)
    assert judge_stage(snap, CANARY, False, 100.0, 200.0, counts).done_at is None  # reopened: clock resets
    started = judge_stage(snap, CANARY, True, None, 1000.0, counts)
    assert (started.done_at, started.decision.events) == (1000.0, ())
    assert judge_stage(snap, CANARY, True, 1000.0, 1059.9, counts).decision.events == ()
    baked = judge_stage(snap, CANARY, True, 1000.0, 1060.0, counts)
    assert (baked.done_at, baked.decision.events, baked.decision.stage) == (1000.0, (E.STAGE_ADVANCED,), 1)
    assert baked.decision.note == "stage 0 baked 60s, gates clear"
    last = judge_stage(_snap(stage=2), CANARY, True, 1000.0, 1060.0, counts).decision
    assert (last.events, last.note) == ((E.LAST_STAGE_DONE,), "3 succeeded, 1 failed")
    promoted = judge_stage(_snap(stage=2, promote=OP), CANARY, True, None, 5.0, counts).decision
    assert (promoted.events, promoted.consumes) == ((E.LAST_STAGE_DONE,), OP)  # skips the bake


@pytest.mark.unit
def test_the_rollback_phase_ends_once_every_device_has_a_revert_outcome() -> None:
    assert decide_revert_end(["reverted", "reverting", "skipped"]).events == ()
    end = decide_revert_end(["reverted", "revert_failed", "skipped", "reverted"])
    assert end.events == (E.REVERT_FINISHED,)
    assert end.note == "2 devices back on their previous bundle, 1 failed to return"
    # the phase ends the way it began: a rollback as a rollback, an abort (or a phase recorded
    # before `rolled_back` existed, with no final state) as an abort
    assert decide_revert_end(["reverted"], "rolled_back").events == (E.ROLLBACK_FINISHED,)
    assert decide_revert_end(["reverted"], "aborted").events == (E.REVERT_FINISHED,)
    assert decide_revert_end(["reverted"], None).events == (E.REVERT_FINISHED,)
    assert decide_revert_end(["reverted"], "bogus").events == (E.REVERT_FINISHED,)


@pytest.mark.unit
def test_where_a_rollback_phase_ends_depends_on_the_event_that_entered_it() -> None:
    assert revert_final_state([E.ROLLBACK_REQUESTED]) is S.ROLLED_BACK
    assert revert_final_state([E.ABORT_REQUESTED]) is S.ABORTED
    assert revert_final_state([E.GATE_BREACH_ABORT]) is S.ABORTED
    assert revert_final_state([E.APPROVAL_TIMEOUT_ABORT]) is S.ABORTED
    assert revert_final_state([E.PAUSE_REQUESTED, E.STAGE_ADVANCED]) is None
    # every event that enters the rollback phase says how it ends, and both ends are terminal
    entering = {e for (src, e), dst in TRANSITIONS.items() if dst is S.ROLLING_BACK}
    assert entering == set(REVERT_END)
    assert {transition(S.ROLLING_BACK, e) for e in REVERT_END.values()} == {S.ABORTED, S.ROLLED_BACK}


# -- the controller only moves through the table ------------------------------------------------
def _pairs(run: Run) -> list[tuple[RolloutState, RolloutEvent]]:
    state, events, _ = run
    out = []
    for event in events:
        out.append((state, event))
        state = TRANSITIONS[(state, event)]
    return out


def _group(world: World, name: str, *devices: str) -> str:
    world.enroll(*devices, labels={"env": "prod", "grp": name})
    return f"grp={name}"


def _tick_until(world: World, rid: str, state: str) -> None:
    """Tick, committing whatever is assigned, until the rollout is in `state`."""
    for _ in range(10):
        if world.state(rid)[0] == state:
            return
        world.commit_all(world.assigned(rid))
        world.ctl.tick()
    raise AssertionError(f"{rid} is {world.state(rid)}, not {state}")


@pytest.mark.integration
def test_the_controller_fires_every_pair_of_the_table_and_nothing_else(world: World) -> None:
    records = RolloutRecords(world.store)
    # canary to completion, rollback after it, devices back on v1
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 0},
                        selector=_group(world, "a", "a1", "a2"))
    world.ctl.tick()
    _tick_until(world, rid, "completed")
    records.command(rid, "rollback", "op")
    world.ctl.tick()
    world.ctl.tick()
    world.commit_all(["a1", "a2"], V1)
    world.ctl.tick()
    assert world.state(rid)[0] == "rolled_back"
    # pause, promote while paused, resume, a gate pause, abort while paused, cancel while rolling back
    rid = world.rollout({"kind": "canary", "stages": [25, 50, 100], "bake_s": 3600, "device_timeout_s": 300},
                        selector=_group(world, "b", "b1", "b2", "b3", "b4"))
    world.ctl.tick()
    world.store.rollouts.request(rid, "pause", "op")
    world.ctl.tick()
    records.command(rid, "promote", "op")
    world.ctl.tick()
    assert world.state(rid) == ("paused", 1)
    world.store.rollouts.request(rid, "resume", "op")
    world.ctl.tick()
    world.clock.advance(301)
    world.ctl.tick()
    assert world.state(rid) == ("paused", 1)  # the silent devices timed out: gate breach
    world.store.rollouts.request(rid, "abort", "op")
    world.ctl.tick()
    records.command(rid, "cancel", "op")
    world.ctl.tick()
    assert world.state(rid)[0] == "cancelled"
    # a gate that aborts, then the devices return
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 0, "on_breach": "abort"},
                        selector=_group(world, "c", "c1", "c2"))
    world.ctl.tick()
    first = world.assigned(rid)[0]
    world.event(first, "rolled_back", "mlp-2.0.0", "golden vectors failed")
    world.ctl.tick()
    world.ctl.tick()
    world.report(first, "idle", V1)
    world.ctl.tick()
    assert world.state(rid)[0] == "aborted"
    # rollouts that never start: no bundle, aborted before the first tick, cancelled before it
    world.store.models.register_version("mlp", "3.0.0", DIGEST, "onnx", {}, "test")
    never = [world.store.rollouts.create("mlp:3.0.0", "grp=d", {}, {}, "op").id,
             world.rollout({}, selector="grp=d"), world.rollout({}, selector="grp=d")]
    world.store.rollouts.request(never[1], "abort", "op")
    records.command(never[2], "cancel", "op")
    world.ctl.tick()
    assert [world.state(r)[0] for r in never] == ["failed", "aborted", "cancelled"]
    # operator intent while running and while paused, one device each
    plan = {"kind": "canary", "stages": [50, 100]}
    ids = {name: world.rollout(plan, selector=_group(world, name, f"{name}-1", f"{name}-2"))
           for name in ("abort", "rollback", "cancel", "paused-rollback", "paused-cancel", "promote-pausing")}
    world.ctl.tick()
    for name in ("paused-rollback", "paused-cancel"):
        world.store.rollouts.request(ids[name], "pause", "op")
    world.ctl.tick()
    world.store.rollouts.request(ids["abort"], "abort", "op")
    for name, command in (("rollback", "rollback"), ("cancel", "cancel"), ("paused-rollback", "rollback"),
                          ("paused-cancel", "cancel"), ("promote-pausing", "promote")):
        records.command(ids[name], command, "op")
    world.store.rollouts.request(ids["promote-pausing"], "pause", "op")
    world.ctl.tick()
    assert {n: world.state(r) for n, r in ids.items()} == {
        "abort": ("rolling_back", 0), "rollback": ("rolling_back", 0), "cancel": ("cancelled", 0),
        "paused-rollback": ("rolling_back", 0), "paused-cancel": ("cancelled", 0),
        "promote-pausing": ("paused", 1)}
    # a cancel the API accepted while the rollout ran, read only after the tick that completed it
    rid = world.rollout({"kind": "all_at_once", "bake_s": 0}, selector=_group(world, "f", "f1"))
    world.ctl.tick()
    world.commit_all(["f1"])
    records.command(rid, "cancel", "op")
    pending = world.ctl.records.pending_commands
    world.ctl.records.pending_commands = lambda r: [c for c in pending(r) if c.command != "cancel"]
    world.ctl.tick()
    assert world.state(rid)[0] == "completed"
    del world.ctl.records.pending_commands
    world.ctl.tick()
    assert world.state(rid)[0] == "cancelled"
    _approval_paths(world, records)

    fired = {pair for run in world.transitions for pair in _pairs(run)}
    assert fired == set(TRANSITIONS), f"not fired: {set(TRANSITIONS) - fired}"
    written = [(e.before["state"], e.after["state"])
               for e in world.store.audit.list(None, 1000, action="rollout.state", actor="controller").items]
    through_table = {(src.value, dst.value) for src, _, dst in world.transitions}
    assert len(written) > 30 and set(written) <= through_table


def _approval_paths(world: World, records: RolloutRecords) -> None:
    """Approval gates: approved, timed out (pause, abort), and what an awaiting rollout may do."""
    # a gate breach while awaiting the approval of stage 1 (stage 0's metrics still count)
    plan = {"kind": "canary", "stages": [50, 100], "bake_s": 0, "approval": {"stages": [1]}}
    gated = {n: world.rollout({**plan, "on_breach": n}, selector=_group(world, f"g{n}", f"g{n}-1", f"g{n}-2"))
             for n in ("pause", "abort")}
    world.ctl.tick()
    world.commit_all([d for r in gated.values() for d in world.assigned(r)])
    world.ctl.tick()
    world.ctl.tick()
    assert {world.state(r) for r in gated.values()} == {("awaiting_approval", 1)}
    world.metrics["mlp-2.0.0"] = VersionMetrics(drift_score=0.9)
    world.ctl.tick()
    del world.metrics["mlp-2.0.0"]
    assert [world.state(r)[0] for r in gated.values()] == ["paused", "rolling_back"]
    # stage 0 waits: approved, timeouts, and operator intent while awaiting
    wait = {"kind": "canary", "stages": [50, 100], "approval": {"stages": [0], "timeout_s": 600}}
    plans = {n: wait for n in ("approve", "t-pause", "a-pause", "a-abort", "a-rollback", "a-cancel")}
    plans["t-abort"] = {**wait, "approval": {"stages": [0], "timeout_s": 600, "on_timeout": "abort"}}
    ids = {n: world.rollout(p, selector=_group(world, n, f"{n}-1")) for n, p in plans.items()}
    world.ctl.tick()
    assert {world.state(r) for r in ids.values()} == {("awaiting_approval", 0)}
    records.command(ids["approve"], "approve", "op")
    world.store.rollouts.request(ids["a-pause"], "pause", "op")
    world.store.rollouts.request(ids["a-abort"], "abort", "op")
    records.command(ids["a-rollback"], "rollback", "op")
    records.command(ids["a-cancel"], "cancel", "op")
    world.clock.advance(601)
    world.ctl.tick()
    assert {n: world.state(r)[0] for n, r in ids.items()} == {
        "approve": "running", "t-pause": "paused", "t-abort": "rolling_back", "a-pause": "paused",
        "a-abort": "rolling_back", "a-rollback": "rolling_back", "a-cancel": "cancelled"}
