"""The rollout controller over a real SQLite store, TUF repository and director signer.

Devices are played by the test: they write reported states into the store (as the
publisher's callback would) and send events through `controller.on_event`. What the
controller publishes is captured by a recorder standing in for the MQTT publisher (the
end-to-end tests with real agents and a real broker are in test_rollouts_agents.py).
Time is an injected clock: nothing here sleeps.
"""

from __future__ import annotations

import pytest

from agent.contract.protocol import Event
from fleet.errors import Conflict
from fleet.rollouts.controller import RolloutController
from fleet.rollouts.controller_ports import ControllerConfig
from fleet.rollouts.gates import VersionMetrics
from fleet.rollouts.records import RolloutRecords
from fleet.store import Store
from tests.support.fakes import DIGEST
from tests.support.rollout_world import V1, V2, World
from tests.support.rollout_world import world as world  # the fixture

pytestmark = pytest.mark.integration


def test_canary_walks_its_stages_only_on_commits_and_bake_time(world: World) -> None:
    devs = [f"d{i:02d}" for i in range(10)]
    world.enroll(*devs)
    world.enroll("other", labels={"env": "dev"})
    rid = world.rollout({"kind": "canary", "stages": [10, 50, 100], "bake_s": 60})
    world.ctl.tick()
    assert world.state(rid) == ("running", 0)
    first = world.assigned(rid)
    assert len(first) == 1 and "other" not in world.devices(rid)
    assert world.pub.last_target(first[0]) == V2
    # downloading and probation are progress, not success
    world.report(first[0], "downloading", V1)
    world.ctl.tick()
    assert world.devices(rid)[first[0]] == "downloading"
    world.report(first[0], "probation", V2)
    world.clock.advance(600)
    world.ctl.tick()
    assert world.devices(rid)[first[0]] == "probation" and world.state(rid) == ("running", 0)
    world.commit_all(first)
    world.ctl.tick()
    assert world.devices(rid)[first[0]] == "succeeded" and world.state(rid) == ("running", 0)  # baking
    world.clock.advance(61)
    world.ctl.tick()
    assert world.state(rid) == ("running", 1)
    world.ctl.tick()
    second = world.assigned(rid)
    assert len(second) == 5 and first[0] in second
    world.commit_all(second)
    world.ctl.tick()
    world.clock.advance(61)
    world.ctl.tick()
    world.ctl.tick()
    assert len(world.assigned(rid)) == 10
    world.commit_all(devs)
    world.ctl.tick()
    world.clock.advance(61)
    world.ctl.tick()
    assert world.state(rid) == ("completed", 2)
    assert set(world.devices(rid).values()) == {"succeeded"}
    states = [e.after["state"] for e in world.store.audit.list(None, 100, resource=f"rollouts/{rid}",
                                                                   action="rollout.state").items]
    assert states[::-1] == ["running", "running", "running", "completed"]


def test_a_silent_device_times_out_trips_the_gate_and_is_upgraded_if_it_commits_late(world: World) -> None:
    world.enroll("a", "b")
    rid = world.rollout({"kind": "all_at_once", "bake_s": 0, "device_timeout_s": 300})
    world.ctl.tick()
    world.commit_all(["a"])
    world.clock.advance(301)
    world.ctl.tick()
    devices = world.devices(rid)
    assert devices == {"a": "succeeded", "b": "failed"}
    ro = world.store.rollouts.get(rid)
    assert (ro.state, ro.desired) == ("paused", "pause")  # 1 of 2 failed > 20 %: paused
    assert "1 of 2 devices failed" in ro.history[-1]["note"]
    breach = world.store.audit.list(None, 10, action="rollout.gate_breach").items[0]
    assert breach.after["breaches"][0]["gate"] == "install_failure_pct"
    world.commit_all(["b"])
    world.ctl.tick()
    assert world.devices(rid)["b"] == "succeeded"
    world.store.rollouts.request(rid, "resume", "op")
    world.ctl.tick()
    assert world.state(rid)[0] == "completed"


def test_local_rollbacks_abort_and_every_device_gets_a_new_document_for_its_previous_bundle(
        world: World) -> None:
    devs = ["a", "b", "c", "d"]
    world.enroll(*devs)
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "on_breach": "abort", "bake_s": 0})
    world.ctl.tick()
    first = world.assigned(rid)
    assert len(first) == 2
    world.event(first[0], "director_accepted", V2)
    world.event(first[0], "rolled_back", V2, "golden vectors failed")
    world.ctl.tick()
    assert world.state(rid)[0] == "rolling_back"
    world.ctl.tick()
    for d in first:  # assigned devices are told to return to v1 (a new, higher-sequence document)
        assert world.pub.last_target(d) == V1
        assert world.pub.docs[d][-1]["sequence"] > world.pub.docs[d][0]["sequence"]
    untouched = [d for d in devs if d not in first]
    assert all(d not in world.pub.docs for d in untouched)
    assert world.state(rid)[0] == "rolling_back"  # until the devices say they are back
    for d in first:
        world.event(d, "director_accepted", V1)
        world.report(d, "idle", V1)
    world.ctl.tick()
    assert world.state(rid)[0] == "aborted"
    statuses = world.devices(rid)
    assert all(statuses[d] == "rolled_back" for d in first)
    assert all(statuses[d] == "skipped" for d in untouched)


def test_operator_abort_and_revert_timeout(world: World) -> None:
    world.enroll("a", "b")
    rid = world.rollout({"kind": "all_at_once", "revert_timeout_s": 100})
    world.ctl.tick()
    world.commit_all(["a", "b"])
    world.store.rollouts.request(rid, "abort", "op", "bad metrics")
    world.ctl.tick()
    world.ctl.tick()
    assert world.pub.last_target("a") == V1 == world.pub.last_target("b")
    world.report("a", "idle", V1)  # b never comes back
    world.clock.advance(101)
    world.ctl.tick()
    assert world.state(rid)[0] == "aborted"
    assert world.devices(rid) == {"a": "rolled_back", "b": "failed"}


@pytest.mark.parametrize("where", ["pending", "running", "paused", "rolling_back"])
def test_cancel_from_any_unfinished_state(world: World, where: str) -> None:
    world.enroll("a", "b")
    rid = world.rollout({"kind": "all_at_once"})
    if where != "pending":
        world.ctl.tick()
    if where == "paused":
        world.store.rollouts.request(rid, "pause", "op")
        world.ctl.tick()
    if where == "rolling_back":
        world.store.rollouts.request(rid, "abort", "op")
        world.ctl.tick()
    assert world.state(rid)[0] == where
    before = {d: len(v) for d, v in world.pub.docs.items()}
    RolloutRecords(world.store).command(rid, "cancel", "op", "stop it")
    world.ctl.tick()
    assert world.state(rid)[0] == "cancelled"
    world.clock.advance(10_000)
    world.ctl.tick()
    assert {d: len(v) for d, v in world.pub.docs.items()} == before  # nothing more was sent
    with pytest.raises(Conflict, match="cancelled"):
        RolloutRecords(world.store).command(rid, "cancel", "op")
    actions = {e.action for e in world.store.audit.list(None, 100, resource=f"rollouts/{rid}").items}
    assert {"rollout.cancel", "rollout.state"} <= actions


def test_promote_skips_the_bake_and_rollback_works_after_completion(world: World) -> None:
    world.enroll("a", "b", "c", "d")
    rid = world.rollout({"kind": "canary", "stages": [25, 100], "bake_s": 86400})
    world.ctl.tick()
    world.commit_all(world.assigned(rid))
    world.ctl.tick()
    assert world.state(rid) == ("running", 0)
    records = RolloutRecords(world.store)
    records.command(rid, "promote", "op", "looks good")
    with pytest.raises(Conflict, match="pending promote"):
        records.command(rid, "promote", "op")
    world.ctl.tick()
    assert world.state(rid) == ("running", 1)
    world.ctl.tick()
    world.commit_all(["a", "b", "c", "d"])
    world.ctl.tick()
    records.command(rid, "promote", "op")  # last stage: completes without the bake
    world.ctl.tick()
    world.ctl.tick()
    assert world.state(rid)[0] == "completed"
    records.command(rid, "rollback", "op", "regret")
    world.ctl.tick()
    world.ctl.tick()
    assert world.state(rid)[0] == "rolling_back"
    assert {world.pub.last_target(d) for d in "abcd"} == {V1}
    world.commit_all(list("abcd"), V1)
    world.ctl.tick()
    assert world.state(rid)[0] == "rolled_back"  # recorded as a rollback, not an abort
    st = world.store.rollouts.get(rid)
    assert st.history[-1]["event"] == "state:rolled_back"
    assert any(h.get("note") == "rollback by op: regret" for h in st.history)
    ends = [e.after for e in world.store.audit.list(None, 100, action="rollout.state",
                                                    resource=f"rollouts/{rid}").items]
    assert [a["state"] for a in ends if a["state"] in ("rolled_back", "aborted")] == ["rolled_back"]
    with pytest.raises(Conflict, match="rolled_back"):
        records.command(rid, "rollback", "op")  # terminal: nothing reopens it


def test_a_restarted_controller_resumes_from_the_store(world: World) -> None:
    world.enroll("a", "b", "c", "d")
    rid = world.rollout({"kind": "canary", "stages": [25, 100], "bake_s": 30})
    world.ctl.tick()
    first = world.assigned(rid)
    world.commit_all(first)
    world.ctl.tick()
    # the fleet process dies: a new store connection and a new controller
    world.store.close()
    world.store = Store(world.location, clock=world.clock)
    sent = {d: len(v) for d, v in world.pub.docs.items()}
    world.ctl = world.new_controller()
    world.clock.advance(31)
    world.ctl.tick()
    assert world.state(rid) == ("running", 1)
    world.ctl.tick()
    assert len(world.pub.docs[first[0]]) == sent[first[0]]  # the canary is not sent again
    world.commit_all(list("abcd"))
    world.ctl.tick()
    world.clock.advance(31)
    world.ctl.tick()
    assert world.state(rid)[0] == "completed"


def test_late_enrolled_devices_join_and_an_unbuilt_version_fails_to_start(world: World) -> None:
    world.enroll("a")
    rid = world.rollout({"kind": "all_at_once", "bake_s": 0})
    world.ctl.tick()
    world.enroll("late")
    world.ctl.tick()
    assert world.pub.last_target("late") == V2
    world.commit_all(["a", "late"])
    world.ctl.tick()
    assert world.state(rid)[0] == "completed"
    world.store.models.register_version("mlp", "3.0.0", DIGEST, "onnx", {}, "test")
    bad = world.store.rollouts.create("mlp:3.0.0", "env=prod", {}, {}, "op").id
    invalid = world.store.rollouts.create("mlp:2.0.0", "env=prod", {"stages": [50]}, {}, "op").id
    world.ctl.tick()
    assert world.state(bad)[0] == "failed"
    assert "no bundle" in world.store.rollouts.get(bad).history[-1]["note"]
    assert world.state(invalid)[0] == "failed"


def test_metric_and_shadow_gates_pause_the_rollout(world: World) -> None:
    world.enroll("a", "b")
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 0},
                        {"min_requests": 100, "max_latency_p95_ratio": 1.2})
    world.metrics[V1] = VersionMetrics(requests=500, errors=1, latency_p95_ms=1.0)
    world.metrics[V2] = VersionMetrics(requests=500, errors=1, latency_p95_ms=3.0)
    world.ctl.tick()
    world.commit_all(world.assigned(rid))
    world.ctl.tick()
    ro = world.store.rollouts.get(rid)
    assert ro.state == "paused" and "latency p95" in ro.history[-1]["note"]
    # resuming acknowledges this stage's breach; the next stage is judged afresh
    world.store.rollouts.request(rid, "resume", "op")
    world.metrics[V2] = VersionMetrics(requests=500, errors=1, latency_p95_ms=1.0)
    world.ctl.tick()
    assert world.state(rid) == ("running", 1)
    canary = world.assigned(rid)[0]
    world.event(canary, "shadow_report", "other-9.9.9")
    world.ctl.on_event(canary, Event(type="shadow_report", bundle_id="x-1.0.0", timestamp=world.clock.now,
                                  seq=1, measurements={"label_agreement": 0.5, "compared": 100}))
    world.ctl.tick()
    ro = world.store.rollouts.get(rid)
    assert ro.state == "paused" and "shadow agreement" in ro.history[-1]["note"]


def test_api_refuses_bad_plans_and_queues_commands_for_operators_only(world: World) -> None:
    from fastapi.testclient import TestClient

    from fleet.access.auth import create_api_key
    from fleet.api import create_app
    from fleet.settings import FleetSettings

    op = {"Authorization": f"Bearer {create_api_key(world.store, 'op', 'operator', 't')[1]}"}
    viewer = {"Authorization": f"Bearer {create_api_key(world.store, 'v', 'viewer', 't')[1]}"}
    with TestClient(create_app(FleetSettings(data_dir=world.root), world.store)) as c:
        bad = c.post("/v1/rollouts", headers=op, json={"model_version_id": "mlp:2.0.0", "selector": "",
                                                       "strategy": {"stages": [50, 20, 100]}})
        assert bad.status_code == 422 and "strictly increasing" in bad.json()["detail"][0]["msg"]
        bad = c.post("/v1/rollouts", headers=op, json={"model_version_id": "mlp:2.0.0", "selector": "",
                                                       "thresholds": {"max_rollback_pct": 500}})
        assert bad.status_code == 422 and "max_rollback_pct" in bad.json()["detail"][0]["msg"]
        rid = c.post("/v1/rollouts", headers=op,
                     json={"model_version_id": "mlp:2.0.0", "selector": ""}).json()["id"]
        assert c.post(f"/v1/rollouts/{rid}/promote", headers=viewer, json={}).status_code == 403
        assert c.post(f"/v1/rollouts/{rid}/promote", headers=op, json={"note": "go"}).status_code == 202
        assert c.post(f"/v1/rollouts/{rid}/promote", headers=op, json={}).status_code == 409
        assert c.post("/v1/rollouts/ro-nope/cancel", headers=op, json={}).status_code == 404


def test_exponential_rate_paces_assignments_by_the_minute(world: World) -> None:
    devs = [f"e{i}" for i in range(10)]
    world.enroll(*devs)
    rid = world.rollout({"kind": "exponential", "base_per_minute": 2, "increment_factor": 2.0,
                         "increase_after_succeeded": 2, "max_per_minute": 3, "bake_s": 0})
    world.ctl.tick()
    first = world.assigned(rid)
    assert len(first) == 2
    world.clock.advance(30)
    world.ctl.tick()
    assert len(world.assigned(rid)) == 2  # the minute is not over
    world.commit_all(first)
    world.clock.advance(31)
    world.ctl.tick()
    assert len(world.assigned(rid)) == 5  # two successes doubled the rate, capped at 3 per minute
    while world.state(rid)[0] != "completed":
        world.commit_all(world.assigned(rid))
        world.clock.advance(61)
        world.ctl.tick()
    assert set(world.devices(rid).values()) == {"succeeded"}


def test_install_failures_and_refused_documents_fail_the_device(world: World) -> None:
    world.enroll("a", "b", "c")
    rid = world.rollout({"kind": "all_at_once"}, {"max_install_failure_pct": 100})
    world.ctl.tick()
    world.event("a", "update_failed", V2, "download refused: hash mismatch")
    world.ctl.on_event("b", Event(type="director_refused", reason="bad signature", timestamp=world.clock.now,
                                  seq=5))
    world.event("c", "rolled_back", "other-1.0.0")  # about another bundle: ignored
    world.ctl.tick()
    assert world.devices(rid) == {"a": "failed", "b": "failed", "c": "assigned"}
    rows = {r.device_id: r for r in RolloutRecords(world.store).progress(rid)}
    assert rows["a"].outcome == "install_failed" and "hash mismatch" in rows["a"].detail
    assert "director document refused" in rows["b"].detail
    assert world.state(rid)[0] == "running"  # thresholds allow it; c still decides


def test_without_a_publisher_rollouts_wait_in_pending(world: World) -> None:
    world.enroll("a")
    rid = world.rollout({"kind": "all_at_once"})
    idle = RolloutController(world.store, world.repo, world.signer, None, world.clock)
    idle.tick()
    assert world.state(rid) == ("pending", 0)
    world.ctl.tick()
    assert world.state(rid) == ("running", 0) and world.pub.last_target("a") == V2


def test_a_device_offline_at_assignment_still_learns_where_to_return(world: World) -> None:
    world.enroll("a", "b")
    # b's Last Will replaced its report: offline, no bundle named
    world.store.devices.record_reported_state("b", {"online": False, "timestamp": world.clock.now})
    rid = world.rollout({"kind": "all_at_once"})
    world.ctl.tick()
    rows = {r.device_id: r for r in RolloutRecords(world.store).progress(rid)}
    assert rows["a"].from_bundle == V1 and rows["b"].from_bundle is None
    world.clock.advance(5)
    world.store.devices.record_reported_state(  # reconnects mid-install: active v2, previous v1
        "b", {"state": "probation", "active_bundle": V2, "previous_bundle": V1, "timestamp": world.clock.now})
    world.ctl.tick()
    world.store.rollouts.request(rid, "abort", "op")
    world.ctl.tick()
    world.ctl.tick()
    assert world.pub.last_target("b") == V1 == world.pub.last_target("a")


def test_a_flood_of_wake_ups_is_coalesced_into_spaced_ticks(world: World) -> None:
    """A thousand devices reporting wake the controller all the time: it must still pause
    `min_tick_gap_s` between ticks instead of ticking back to back, and lose no event."""
    import itertools
    import threading
    import time

    ctl = RolloutController(world.store, world.repo, world.signer, world.pub, world.clock,
                            ControllerConfig(tick_s=1.0, min_tick_gap_s=0.2), metrics=world)
    starts: list[float] = []
    real_tick = ctl.tick

    def counting_tick() -> None:
        starts.append(time.monotonic())
        real_tick()

    ctl.tick = counting_tick  # type: ignore[method-assign]
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            ctl.on_reported("a", None)  # type: ignore[arg-type]
            time.sleep(0.001)

    flooder = threading.Thread(target=flood)
    ctl.start()
    flooder.start()
    try:
        deadline = time.monotonic() + 60
        while len(starts) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        flooder.join()
        ctl.stop()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) >= 3 and min(gaps) >= 0.19  # woken ~200 times per gap, ticked once


def test_shadow_agreement_survives_a_controller_restart(world: World) -> None:
    world.enroll("a", "b")
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 3600})
    world.ctl.tick()
    canary = world.assigned(rid)[0]

    def shadow(ctl: RolloutController, agreement: float, seq: int) -> None:
        ctl.on_event(canary, Event(type="shadow_report", bundle_id=V2, timestamp=world.clock.now, seq=seq,
                                   measurements={"label_agreement": agreement, "compared": 100}))
        ctl.tick()

    shadow(world.ctl, 1.0, 1)
    assert world.state(rid) == ("running", 0)
    restarted = world.new_controller()  # a fleet restart: a new instance over the same store
    rt = RolloutRecords(world.store).runtime(rid)
    assert rt is not None and rt.shadow_agreement == 1.0
    shadow(restarted, 0.7, 2)  # 200 rows compared in all: (100 x 1.0 + 100 x 0.7) / 200
    ro = world.store.rollouts.get(rid)
    assert ro.state == "paused" and "shadow agreement 0.850" in ro.history[-1]["note"]


def test_a_rollback_cut_by_a_restart_still_ends_rolled_back_and_an_abort_aborted(world: World) -> None:
    world.enroll("a", "b")
    back = world.rollout({"kind": "all_at_once", "bake_s": 0}, selector="env=prod")
    world.ctl.tick()
    world.commit_all(["a", "b"])
    world.ctl.tick()
    assert world.state(back)[0] == "completed"
    RolloutRecords(world.store).command(back, "rollback", "op", "regret")
    world.ctl.tick()
    assert world.state(back)[0] == "rolling_back"
    assert RolloutRecords(world.store).runtime(back).final_state == "rolled_back"  # persisted on entry
    # the fleet process dies mid-revert: the new controller reads how the phase began
    world.store.close()
    world.store = Store(world.location, clock=world.clock)
    world.ctl = world.new_controller()
    world.ctl.tick()
    world.commit_all(["a", "b"], V1)
    world.ctl.tick()
    assert world.state(back)[0] == "rolled_back"
    assert world.store.rollouts.list(None, 10, "rolled_back").items[0].id == back
    # the same work begun by an abort is recorded as an abort
    world.enroll("c")
    stop = world.rollout({"kind": "all_at_once", "bake_s": 0}, selector="env=prod")
    world.ctl.tick()
    world.store.rollouts.request(stop, "abort", "op")
    world.ctl.tick()
    assert RolloutRecords(world.store).runtime(stop).final_state == "aborted"
    world.ctl.tick()
    world.commit_all(["a", "b", "c"], V1)
    world.ctl.tick()
    assert world.state(stop)[0] == "aborted"
