"""Site policies end to end: the real fleet service, a private Mosquitto and real agent processes.

A closed activation window travels in the signed director document to the agents, which
prefetch and verify the bundle, then hold it (`waiting_for_window` in their reported state)
while the fleet counts them apart and does not time them out; a rollout of the same bundle
with an open window then activates it, one device per site at a time (a disruption budget).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.agent_world import Agent, wait_until
from tests.support.service_world import ServiceWorld

pytestmark = pytest.mark.integration
DEVICES = {"gw-1": "north", "gw-2": "north", "gw-3": "south"}
PREFIX = "ef-sp"
FAST_HEALTH = {"probation_requests": 0, "probation_seconds": 0.3, "inference_timeout_s": 2.0,
               "traffic": "none"}


class World(ServiceWorld[Agent]):
    def rollout(self, version: str, strategy: dict[str, Any]) -> str:
        return self.create_rollout(version, "env=lab", strategy)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World.open(tmp_path_factory.mktemp("site-policies"), PREFIX, {"1.0.0": (1, 1), "2.0.0": (2, 2)},
                   FAST_HEALTH, Agent)
    for version in ("1.0.0", "2.0.0"):
        w.register_bundle(version)
    for d, site in DEVICES.items():
        w.add_agent(d, {"env": "lab", "site": site})
    try:
        rid = w.rollout("1.0.0", {"kind": "all_at_once"})
        wait_until(lambda: w.status(rid)["state"] == "completed", 60, f"v1 everywhere\n{w.logs()}")
        yield w
    finally:
        w.close()


def test_a_closed_window_holds_on_the_devices_then_an_open_one_activates_within_the_budget(
        world: World) -> None:
    later = datetime.now(UTC) + timedelta(hours=12)  # a window that is closed for the whole test
    closed = {"activation": {"cron": f"{later.minute} {later.hour} * * *", "duration_s": 60}, "tz": "UTC"}
    rid = world.rollout("2.0.0", {"kind": "all_at_once", "device_timeout_s": 5, "windows": closed})

    def all_waiting() -> bool:
        return world.status(rid)["devices_by_status"] == {"waiting_for_window": 3}

    wait_until(all_waiting, 60, f"every device waiting for its window ({world.status(rid)})\n{world.logs()}")
    for d in DEVICES:
        rep = world.reported(d)
        assert (rep["state"], rep["active_bundle"]) == ("staged", "mlp-1.0.0")  # prefetched, verified
        assert rep["hold"] == "waiting_for_window"
    past_timeout = time.monotonic() + 6  # beyond device_timeout_s: still waiting, not failed
    wait_until(lambda: time.monotonic() > past_timeout, 20, "the device timeout to pass")
    assert all_waiting() and world.status(rid)["state"] == "running"
    with world.api as c:  # the old rollout makes way for one with an open window
        assert c.post(f"/v1/rollouts/{rid}/cancel", json={}).status_code == 202
    budget = {"group_by": ["site"], "max_unavailable": 1}
    rid = world.rollout("2.0.0", {"kind": "all_at_once", "budget": budget,
                                  "windows": {"activation": {"cron": "* * * * *", "duration_s": 3600}}})
    in_flight_north: list[int] = []

    def done() -> bool:
        rows = world.service.store.rollouts.devices(rid, None, 10).items
        in_flight_north.append(sum(r.status not in ("pending", "succeeded") for r in rows
                                   if DEVICES[r.device_id] == "north"))
        return world.status(rid)["state"] == "completed"

    wait_until(done, 60, f"rollout with an open window completed ({world.status(rid)})\n{world.logs()}")
    assert max(in_flight_north) <= 1  # never both north devices at once
    assert world.status(rid)["devices_by_status"] == {"succeeded": 3}
    for d in DEVICES:
        rep = world.reported(d)
        assert (rep["state"], rep["active_bundle"], rep.get("hold")) == ("idle", "mlp-2.0.0", None)
