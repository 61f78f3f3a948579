"""Rollouts end to end: the real fleet service (API + publisher + controller + refresher, as
`edgefleet fleet serve` wires it) over SQLite, a private Mosquitto, and real agent processes.

Bundles are registered through the API from bundle files (`from-bundle`), rollouts created
and steered through the API; agents are `python -m agent.cli agent run` subprocesses whose
local Unix API proves which model they really serve. One fleet and four agents per module;
each test starts from "every device serves the previous test's result".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fleet.store import Store
from simulators.models import mlp_reference, mlp_weights
from tests.support.agent_world import Agent, wait_until
from tests.support.lifecycle_world import X
from tests.support.service_world import ServiceWorld

pytestmark = pytest.mark.integration
DEVICES = ["gw-a", "gw-b", "gw-c", "gw-d"]
PREFIX = "ef-ro"
FAST_HEALTH = {"probation_requests": 0, "probation_seconds": 0.3, "inference_timeout_s": 2.0,
               "traffic": "none"}  # the agents see no traffic in probation: golden vectors decide
# version -> (model seed, golden seed): 3.0.0 carries the golden vectors of another model
BUNDLES = {"1.0.0": (1, 1), "2.0.0": (2, 2), "3.0.0": (3, 2), "4.0.0": (4, 4), "5.0.0": (5, 5)}


class RolloutAgent(Agent):
    def wait_serving_model(self, bundle: str) -> None:
        """The local API answers with the bundle's model (its reference outputs)."""
        seed = BUNDLES[bundle.removeprefix("mlp-")][0]

        def ok() -> bool:
            try:
                return bool(np.allclose(self.predict_unix(), mlp_reference(X, mlp_weights(seed)), atol=1e-4))
            except Exception:
                return False

        wait_until(ok, 20, f"{self.device} answering with {bundle}")


class World(ServiceWorld[RolloutAgent]):
    def rollout(self, version: str, strategy: dict[str, Any],
                thresholds: dict[str, float] | None = None) -> str:
        return self.create_rollout(version, "site=lab", strategy, thresholds or {})

    def wait_all_serving(self, bundle: str, devices: list[str] | None = None, timeout: float = 60.0) -> None:
        for d in devices or DEVICES:
            wait_until(lambda: self.serving(d) == bundle, timeout, f"{d} serving {bundle}\n{self.logs()}")  # noqa: B023
            self.agents[d].wait_serving_model(bundle)

    def status_offline(self, rid: str) -> tuple[str, int]:
        """State and stage straight from the database (while the service is down)."""
        store = Store(self.settings.db_path)
        try:
            ro = store.rollouts.get(rid)
            return ro.state, ro.stage
        finally:
            store.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World.open(tmp_path_factory.mktemp("rollouts-agents"), PREFIX, BUNDLES, FAST_HEALTH, RolloutAgent)
    for version in BUNDLES:
        assert w.register_bundle(version)["bundle_target"] == f"models/mlp/mlp-{version}.efb"
    with w.api as c:
        again = c.post("/v1/models/mlp/versions/from-bundle", json={"path": "mlp-1.0.0.efb"})
        assert again.status_code == 409
        escape = c.post("/v1/models/mlp/versions/from-bundle", json={"path": "../fleet.db"})
        assert escape.status_code == 422
    for d in DEVICES:
        w.add_agent(d, {"site": "lab"})
    try:
        rid = w.rollout("1.0.0", {"kind": "all_at_once", "bake_s": 0})  # fresh devices get v1
        w.wait_rollout(rid, "completed", 60)
        w.wait_all_serving("mlp-1.0.0")
        yield w
    finally:
        w.close()


def test_a_good_bundle_reaches_every_device_through_canary_stages(world: World) -> None:
    rid = world.rollout("2.0.0", {"kind": "canary", "stages": [25, 50, 100], "bake_s": 0.5})
    st = world.wait_rollout(rid, "completed")
    assert st["devices_by_status"] == {"succeeded": 4}
    world.wait_all_serving("mlp-2.0.0")
    history = world.service.store.rollouts.get(rid).history
    stages = [h["stage"] for h in history if h["event"] == "state:running"]
    assert stages == [0, 1, 2]  # every stage was walked, none skipped
    # the canary device committed before the second stage was assigned
    with world.api as c:
        devices = c.get(f"/v1/rollouts/{rid}/devices").json()["items"]
    assert sorted(d["stage"] for d in devices) == [0, 1, 2, 2]


def test_a_bundle_failing_health_aborts_and_every_device_ends_on_the_previous_version(world: World) -> None:
    world.wait_all_serving("mlp-2.0.0")
    rid = world.rollout("3.0.0", {"kind": "canary", "stages": [50, 100], "bake_s": 0, "on_breach": "abort"})
    st = world.wait_rollout(rid, "aborted")
    by_status = st["devices_by_status"]
    assert by_status.get("rolled_back") == 2 and by_status.get("skipped") == 2, by_status
    assert "succeeded" not in by_status
    world.wait_all_serving("mlp-2.0.0")
    breach = world.service.store.audit.list(None, 10, resource=f"rollouts/{rid}",
                                            action="rollout.gate_breach")
    assert breach.items and breach.items[0].after["action"] == "abort"


def test_an_offline_device_catches_up_when_it_reconnects(world: World) -> None:
    world.wait_all_serving("mlp-2.0.0")
    world.agents["gw-d"].stop()
    wait_until(lambda: not world.service.store.devices.get("gw-d").online, 20, "gw-d offline")
    rid = world.rollout("4.0.0", {"kind": "all_at_once", "bake_s": 0, "device_timeout_s": 120})
    world.wait_all_serving("mlp-4.0.0", ["gw-a", "gw-b", "gw-c"])
    st = world.status(rid)
    assert st["state"] == "running" and st["devices_by_status"]["assigned"] == 1, st
    world.agents["gw-d"].start()
    world.wait_rollout(rid, "completed")
    world.wait_all_serving("mlp-4.0.0")


def test_a_fleet_restarted_mid_rollout_resumes_it_and_cancel_stops_one(world: World) -> None:
    world.wait_all_serving("mlp-4.0.0")
    rid = world.rollout("5.0.0", {"kind": "canary", "stages": [25, 100], "bake_s": 3})
    wait_until(lambda: world.status(rid)["devices_by_status"].get("succeeded") == 1, 30, "the canary")
    world.service.stop()  # the whole fleet process goes away mid-rollout
    assert world.status_offline(rid) == ("running", 0)
    world.start_service()
    world.wait_rollout(rid, "completed")
    world.wait_all_serving("mlp-5.0.0")
    # cancel: a rollout that would wait a day in its first stage stops at once, devices untouched
    slow = world.rollout("4.0.0", {"kind": "canary", "stages": [25, 100], "bake_s": 86400})
    wait_until(lambda: world.status(slow)["devices_by_status"].get("succeeded") == 1, 30, "the slow canary")
    with world.api as c:
        assert c.post(f"/v1/rollouts/{slow}/cancel", json={"note": "changed my mind"}).status_code == 202
        world.wait_rollout(slow, "cancelled", 10)
        assert c.post(f"/v1/rollouts/{slow}/cancel", json={}).status_code == 409
    assert sorted(str(world.serving(d)) for d in DEVICES) == ["mlp-4.0.0"] + ["mlp-5.0.0"] * 3



def test_an_ab_experiment_puts_each_device_on_its_arm(world: World) -> None:
    from fleet.rollouts.experiments import arm_of

    with world.api as c:
        res = c.post("/v1/experiments", json={"name": "v4-vs-v5", "version_a": "mlp:4.0.0",
                                              "version_b": "mlp:5.0.0", "selector": "site=lab",
                                              "split_b": 0.5})
        assert res.status_code == 201, res.text
        eid = res.json()["id"]
        for d in DEVICES:
            want = "mlp-5.0.0" if arm_of(eid, d, 0.5) == "b" else "mlp-4.0.0"
            world.wait_all_serving(want, [d])
        # A device may already serve its arm's bundle (an earlier test put it there) before the
        # driver's next tick records its assignment: wait for the records, then check them.
        def all_recorded() -> dict[str, int] | None:
            arms: dict[str, int] = c.get(f"/v1/experiments/{eid}").json()["devices"]
            return arms if arms["a"] + arms["b"] == len(DEVICES) else None

        got = wait_until(all_recorded, 10.0, "every device's experiment assignment recorded")
        assert got["a"] + got["b"] == len(DEVICES)
        assert got["b"] == sum(arm_of(eid, d, 0.5) == "b" for d in DEVICES)
        rec = c.get(f"/v1/experiments/{eid}/recommendation").json()
        # real telemetry: no request failed in either arm, so error rate cannot pick a winner;
        # and 4 devices are fewer than `min_devices` (10) per arm, so nothing can: the real
        # timings that differ between processes are not evidence about the versions
        by = {m["metric"]: m for m in rec["metrics"]}
        assert set(by) == {"error_rate", "latency_ms"} and by["error_rate"]["winner"] is None
        assert rec["verdict"] == "inconclusive", rec["summary"]
        assert "more devices per arm" in rec["summary"] and by["latency_ms"]["devices_needed"] >= 10


def test_a_disagreeing_shadow_candidate_pauses_the_rollout(world: World) -> None:
    plan = {"kind": "all_at_once", "bake_s": 60, "shadow_model_version_id": "mlp:4.0.0"}
    rid = world.rollout("5.0.0", plan, {"min_shadow_agreement": 0.95})
    world.wait_all_serving("mlp-5.0.0")

    def paused() -> bool:
        for agent in world.agents.values():  # traffic the shadow (v4, other weights) disagrees on
            agent.predict_unix()
        return bool(world.status(rid)["state"] == "paused")

    wait_until(paused, 40, f"a shadow-agreement pause ({world.status(rid)})")
    note = world.service.store.rollouts.get(rid).history[-1]["note"]
    assert "shadow agreement" in note, note
