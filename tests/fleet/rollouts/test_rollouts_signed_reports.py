"""Rollout success is counted only from signed reports (issue 14; aktualizr#89: unsigned
secondary events became a signed "success")."""

from __future__ import annotations

import pytest

from tests.support.rollout_world import V2, World
from tests.support.rollout_world import world as world  # the fixture


@pytest.mark.integration
def test_an_unsigned_committed_report_does_not_count_as_success(world: World) -> None:
    world.enroll("signed", "unsigned")
    rid = world.rollout({"kind": "all_at_once", "bake_s": 0, "device_timeout_s": 300})
    world.ctl.tick()
    assert world.assigned(rid) == ["signed", "unsigned"]
    world.report("signed", "idle", V2)  # stored from a verified report (the default of the store API)
    # what `report_signatures: optional` lets in for a keyless device: stored, marked unsigned
    world.store.devices.record_reported_state(
        "unsigned", {"state": "idle", "active_bundle": V2, "timestamp": world.clock.now}, signed=False)
    world.ctl.tick()
    devices = world.devices(rid)
    assert devices["signed"] == "succeeded" and devices["unsigned"] != "succeeded"
    assert world.store.devices.get("unsigned").reported_state["active_bundle"] == V2  # inventory shows it
    world.clock.advance(301)
    world.ctl.tick()
    assert world.devices(rid)["unsigned"] == "failed"  # silent as far as the rollout is concerned
    world.report("unsigned", "idle", V2)  # once it reports signed, the late commit counts
    world.ctl.tick()
    assert world.devices(rid)["unsigned"] == "succeeded"
