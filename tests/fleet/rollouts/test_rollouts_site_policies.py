"""Site policies of a rollout over the rollout world: budgets, approvals, success thresholds, holds.

The controller runs against a real store, TUF repository and director signer; devices are
played by the test and time is the world's injected clock (nothing waits for real).
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleet.db.rows import iso
from fleet.rollouts.approval import decide_approval
from fleet.rollouts.gates import OutcomeCounts
from fleet.rollouts.machine import (
    Command,
    Decision,
    Desired,
    QueuedCommand,
    RolloutSnapshot,
    RolloutState,
    Work,
    decide_operator,
)
from fleet.rollouts.policies import (
    DisruptionBudget,
    PolicyError,
    admit,
    check_cohort_policies,
    starved_groups,
    success_breach,
    windows_for,
)
from fleet.rollouts.records import RolloutRecords
from fleet.rollouts.strategies import StrategyConfig
from tests.support.rollout_world import V2, World
from tests.support.rollout_world import world as world  # the fixture


# -- budgets, pure -------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_budget_bounds_each_group_by_count_percent_or_min_available() -> None:
    assert DisruptionBudget(group_by=["site"], max_unavailable=2).allowed(10) == 2
    assert DisruptionBudget(group_by=["site"], max_unavailable="25%").allowed(10) == 3  # rounded up
    assert DisruptionBudget(group_by=["site"], min_available=8).allowed(10) == 2
    both = DisruptionBudget(group_by=["site"], max_unavailable=5, min_available=8)
    assert both.allowed(10) == 2 and both.allowed(3) == 0
    assert both.group_of({"site": "a", "x": "y"}) == "site=a"
    assert both.group_of({}) == "site=(none)"


@pytest.mark.unit
def test_admit_starts_devices_in_order_without_passing_any_group_budget() -> None:
    budget = DisruptionBudget(group_by=["site"], max_unavailable=1)
    waiting = [("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")]
    sizes = {"a": 2, "b": 2, "c": 1}
    assert admit(budget, waiting, sizes, {}, 10) == ["a1", "b1", "c1"]
    assert admit(budget, waiting, sizes, {"a": 1}, 10) == ["b1", "c1"]
    assert admit(budget, waiting, sizes, {}, 2) == ["a1", "b1"]  # the strategy's quota still bounds it
    assert admit(None, waiting, sizes, {"a": 5}, 2) == ["a1", "a2"]
    assert admit(budget, waiting, sizes, {}, 0) == []


@pytest.mark.unit
def test_budgets_that_could_never_let_a_group_progress_are_refused() -> None:
    with pytest.raises(ValidationError, match="max_unavailable 0"):
        DisruptionBudget(group_by=["site"], max_unavailable=0)
    with pytest.raises(ValidationError, match="max_unavailable 0"):
        DisruptionBudget(group_by=["site"], max_unavailable="0%")
    with pytest.raises(ValidationError, match="needs max_unavailable or min_available"):
        DisruptionBudget(group_by=["site"])
    # Flight Control's issue 892: min_available at the group size starves that group
    budget = DisruptionBudget(group_by=["site"], min_available=3)
    assert starved_groups(budget, {"site=a": 3, "site=b": 5}) == ["site=a (3 devices)"]
    cohort = [(f"d{i}", {"site": "a" if i < 3 else "b"}) for i in range(8)]
    with pytest.raises(PolicyError, match="site=a") as info:
        check_cohort_policies(budget, None, cohort)
    assert info.value.loc == ("body", "strategy", "budget")
    check_cohort_policies(DisruptionBudget(group_by=["site"], min_available=2), None, cohort)


@pytest.mark.unit
def test_success_threshold_and_its_per_stage_form() -> None:
    assert success_breach(95.0, 0, OutcomeCounts(assigned=20, succeeded=19, install_failed=1)) is None
    short = success_breach(95.0, 1, OutcomeCounts(assigned=20, succeeded=18, install_failed=2))
    assert short is not None and short.gate == "success_pct" and short.value == 90.0
    # a missed window is neither a success nor a failure
    assert success_breach(95.0, 0, OutcomeCounts(assigned=20, succeeded=19, window_missed=5)) is None
    cfg = StrategyConfig.parse({"stages": [10, 100], "success_threshold_pct": [100, 95]})
    assert (cfg.success_threshold(0), cfg.success_threshold(1)) == (100, 95)
    with pytest.raises(Exception, match="one value per stage"):
        StrategyConfig.parse({"stages": [10, 100], "success_threshold_pct": [100]})
    with pytest.raises(Exception, match=r"approval\.stages"):
        StrategyConfig.parse({"stages": [10, 100], "approval": {"stages": [2]}})


@pytest.mark.unit
def test_windows_resolve_per_label_group_and_zone() -> None:
    cfg = StrategyConfig.parse({"windows": {
        "download": {"cron": "0 0 * * *", "duration_s": 21600},
        "activation": {"cron": "0 2 * * *", "duration_s": 7200},
        "groups": [{"match": {"site": "plant-3"}, "activation": {"cron": "30 3 * * 6", "duration_s": 3600},
                    "tz": "America/Chicago"}]}})
    berlin = windows_for(cfg.windows, {"site": "plant-1", "tz": "Europe.Berlin"})  # label values hold no '/'
    assert berlin is not None and berlin.tz == "Europe/Berlin" and berlin.activation is not None
    assert berlin.activation.cron == "0 2 * * *"
    plant3 = windows_for(cfg.windows, {"site": "plant-3", "tz": "Europe.Berlin"})
    assert plant3 is not None and plant3.tz == "America/Chicago"  # the group's explicit zone wins
    assert plant3.activation is not None and plant3.activation.cron == "30 3 * * 6"
    assert plant3.download is not None and plant3.download.cron == "0 0 * * *"  # inherited
    unzoned = windows_for(cfg.windows, {"site": "x"})
    assert unzoned is not None and unzoned.tz is None  # the agent's own zone
    assert windows_for(None, {"site": "x"}) is None
    with pytest.raises(PolicyError, match=r"tz='Mars\.Olympus'"):
        check_cohort_policies(None, cfg.windows, [("d1", {"tz": "Mars.Olympus"})])


@pytest.mark.unit
def test_a_promote_queued_as_the_rollout_began_to_wait_does_not_skip_the_approval() -> None:
    cfg = StrategyConfig.parse({"stages": [10, 50, 100], "approval": {"stages": [1]}})
    waiting = RolloutSnapshot(state=RolloutState.AWAITING_APPROVAL, desired=Desired.RUN, stage=1,
                              started=True, commands={Command.PROMOTE: QueuedCommand(1, "op")})
    assert decide_operator(waiting, cfg) == Decision(work=Work.FORWARD)
    step = decide_approval(waiting, cfg, approved_stage=0, requested_at=0.0, now=10.0)
    assert step is not None and step.gated and step.decision.events == ()


# -- scenarios -----------------------------------------------------------------------------------
def _in_flight_per_site(world: World, rid: str) -> Counter[str]:
    rows = RolloutRecords(world.store).progress(rid)
    labels = RolloutRecords(world.store).labels_of([r.device_id for r in rows])
    return Counter(labels[r.device_id]["site"] for r in rows
                   if r.assigned_at is not None and r.outcome is None)


@pytest.mark.integration
def test_a_budget_of_one_per_site_across_ten_sites(world: World) -> None:
    for site in range(10):
        world.enroll(*(f"s{site}-d{i}" for i in range(3)), labels={"env": "prod", "site": f"s{site}"})
    rid = world.rollout({"kind": "all_at_once", "budget": {"group_by": ["site"], "max_unavailable": 1}})
    world.ctl.tick()
    first = world.assigned(rid)
    assert len(first) == 10 and {d.split("-")[0] for d in first} == {f"s{i}" for i in range(10)}
    ticks = 0
    while world.state(rid)[0] != "completed":
        ticks += 1
        assert ticks < 10, world.devices(rid)
        assert max(_in_flight_per_site(world, rid).values(), default=0) <= 1
        world.ctl.tick()  # nothing new while every site has one in flight
        assert max(_in_flight_per_site(world, rid).values(), default=0) <= 1
        world.commit_all([d for d, s in world.devices(rid).items() if s == "assigned"])
        world.clock.advance(1)
        world.ctl.tick()
    assert ticks == 3  # three devices per site, one at a time
    assert set(world.devices(rid).values()) == {"succeeded"}


@pytest.mark.integration
def test_an_approval_that_arrives_in_time_starts_the_stage(world: World) -> None:
    world.enroll("d1", "d2")
    records = RolloutRecords(world.store)
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 0,
                         "approval": {"stages": [1], "timeout_s": 600}})
    world.ctl.tick()
    world.commit_all(world.assigned(rid))
    world.ctl.tick()
    world.ctl.tick()
    assert world.state(rid) == ("awaiting_approval", 1)
    assert world.store.rollouts.status(rid).approval_due == iso(world.clock.now + 600)
    world.clock.advance(300)
    world.ctl.tick()
    assert len(world.assigned(rid)) == 1  # nothing assigned while it waits
    records.command(rid, "approve", "alice", "checked plant 3")
    world.ctl.tick()
    assert world.state(rid) == ("running", 1) and len(world.assigned(rid)) == 2
    history = [h["note"] for h in world.store.rollouts.get(rid).history if h.get("note")]
    assert "stage 1 approved by alice: checked plant 3" in history
    assert [e.action for e in world.store.audit.list(None, 100, action="rollout.approve").items] == \
        ["rollout.approve"]
    world.commit_all(world.assigned(rid))
    world.ctl.tick()
    assert world.state(rid)[0] == "completed"


@pytest.mark.integration
def test_a_late_approval_after_the_timeout_paused_it(world: World) -> None:
    world.enroll("d1")
    records = RolloutRecords(world.store)
    rid = world.rollout({"kind": "all_at_once", "approval": {"stages": [0], "timeout_s": 120}})
    world.ctl.tick()
    assert world.state(rid) == ("awaiting_approval", 0) and world.assigned(rid) == []
    world.clock.advance(121)
    world.ctl.tick()
    ro = world.store.rollouts.get(rid)
    assert (ro.state, ro.desired) == ("paused", "pause")  # resumed with the ordinary `resume`
    records.command(rid, "approve", "bob")  # late: recorded while paused
    world.ctl.tick()
    assert world.state(rid)[0] == "paused" and world.assigned(rid) == []
    world.store.rollouts.request(rid, "resume", "bob")
    world.ctl.tick()
    assert world.state(rid)[0] == "running" and world.assigned(rid) == ["d1"]
    world.commit_all(["d1"])
    world.ctl.tick()
    assert world.state(rid)[0] == "completed"


@pytest.mark.integration
def test_an_approval_timeout_that_aborts_refuses_the_late_approval(world: World) -> None:
    world.enroll("d1", "d2")
    records = RolloutRecords(world.store)
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 0,
                         "approval": {"stages": [1], "timeout_s": 60, "on_timeout": "abort"}})
    world.ctl.tick()
    first = world.assigned(rid)
    world.commit_all(first)
    world.ctl.tick()
    world.ctl.tick()
    with pytest.raises(Exception, match="approve it"):
        records.command(rid, "promote", "op")  # promote does not skip an approval
    world.clock.advance(61)
    world.ctl.tick()
    assert world.state(rid)[0] == "rolling_back"
    with pytest.raises(Exception, match="not awaiting approval"):
        records.command(rid, "approve", "op")
    world.ctl.tick()  # the revert documents go out
    world.commit_all(first, "mlp-1.0.0")
    world.ctl.tick()
    assert world.state(rid)[0] == "aborted"


@pytest.mark.integration
def test_a_stage_below_its_success_threshold_does_not_advance(world: World) -> None:
    world.enroll(*(f"d{i}" for i in range(10)))
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 0, "success_threshold_pct": 95},
                        thresholds={"max_install_failure_pct": 100})
    world.ctl.tick()
    stage0 = world.assigned(rid)
    assert len(stage0) == 5
    world.commit_all(stage0[1:])
    world.event(stage0[0], "update_failed", V2, "disk full")
    world.ctl.tick()
    assert world.state(rid) == ("paused", 0)
    breach = RolloutRecords(world.store).runtime(rid)
    assert breach is not None and breach.breach is not None
    assert [b["gate"] for b in breach.breach.items] == ["success_pct"]
    # the operator accepts it: resuming acknowledges this stage's gates
    world.store.rollouts.request(rid, "resume", "op")
    world.ctl.tick()
    world.ctl.tick()
    assert world.state(rid) == ("running", 1)


@pytest.mark.integration
def test_devices_waiting_for_their_window_are_not_timed_out_and_then_miss_it(world: World) -> None:
    world.enroll("d1", "d2", labels={"env": "prod", "tz": "Europe.Berlin"})
    rid = world.rollout({"kind": "all_at_once", "device_timeout_s": 300, "window_timeout_s": 3600,
                         "windows": {"activation": {"cron": "0 2 * * *", "duration_s": 7200}}})
    world.ctl.tick()
    doc = world.pub.docs["d1"][-1]
    assert doc["windows"] == {"activation": {"cron": "0 2 * * *", "duration_s": 7200}, "tz": "Europe/Berlin"}
    for dev in ("d1", "d2"):
        world.store.devices.record_reported_state(dev, {"state": "staged", "active_bundle": "mlp-1.0.0",
                                                        "hold": "waiting_for_window",
                                                        "timestamp": world.clock.now})
    world.clock.advance(301)
    world.ctl.tick()
    assert world.devices(rid) == {"d1": "waiting_for_window", "d2": "waiting_for_window"}
    world.report("d1", "idle", V2)  # d1's window opened: committed
    world.clock.advance(3400)
    world.ctl.tick()
    assert world.devices(rid) == {"d1": "succeeded", "d2": "window_missed"}
    status = world.store.rollouts.status(rid)
    assert status.devices_by_status == {"succeeded": 1, "window_missed": 1}
    assert world.state(rid)[0] == "completed"  # a missed window is not a failure: no gate breach


@pytest.mark.integration
def test_held_devices_show_apart_and_their_timeout_restarts_when_they_resume(world: World) -> None:
    world.enroll("d1")
    rid = world.rollout({"kind": "all_at_once", "device_timeout_s": 300})
    world.ctl.tick()
    world.store.devices.record_reported_state("d1", {"state": "idle", "active_bundle": "mlp-1.0.0",
                                                     "hold": "held: low_memory (40 MB free, 96 MB needed)",
                                                     "timestamp": world.clock.now})
    world.clock.advance(290)
    world.ctl.tick()
    assert world.store.rollouts.status(rid).devices_by_status == {"held": 1}
    world.clock.advance(200)  # past device_timeout_s since the document, but it said why it waits
    world.store.devices.record_reported_state("d1", {"state": "downloading", "active_bundle": "mlp-1.0.0",
                                                     "timestamp": world.clock.now})
    world.ctl.tick()
    assert world.devices(rid) == {"d1": "downloading"}
    world.report("d1", "idle", V2)
    world.ctl.tick()
    assert world.devices(rid) == {"d1": "succeeded"}


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(groups=st.lists(st.integers(0, 5), min_size=0, max_size=40),
       busy=st.dictionaries(st.integers(0, 5), st.integers(0, 4), max_size=6),
       cap=st.one_of(st.integers(1, 5), st.sampled_from(["10%", "50%", "100%"])),
       quota=st.integers(0, 50))
def test_admit_never_passes_a_budget_and_leaves_no_place_unused(groups: list[int], busy: dict[int, int],
                                                                  cap: int | str, quota: int) -> None:
    budget = DisruptionBudget(group_by=["site"], max_unavailable=cap)
    waiting = [(f"d{i}", f"g{g}") for i, g in enumerate(groups)]
    in_flight = {f"g{g}": n for g, n in busy.items()}
    sizes = Counter(g for _, g in waiting) + Counter(in_flight)
    chosen = admit(budget, waiting, sizes, in_flight, quota)
    assert len(chosen) <= quota and len(set(chosen)) == len(chosen)
    group = dict(waiting)
    after = Counter(in_flight) + Counter(group[d] for d in chosen)
    for g, n in after.items():
        assert n <= max(budget.allowed(sizes[g]), in_flight.get(g, 0))  # never more than allowed
    if len(chosen) < quota:  # every group with a device left waiting is full
        for d, g in waiting:
            assert d in chosen or after[g] >= budget.allowed(sizes[g])
    assert chosen == [d for d, _ in waiting if d in set(chosen)]  # in canary order
