"""Site policies end to end: the real fleet service, a private Mosquitto and real agent processes.

A closed activation window travels in the signed director document to the agents, which
prefetch and verify the bundle, then hold it (`waiting_for_window` in their reported state)
while the fleet counts them apart and does not time them out; a rollout of the same bundle
with an open window then activates it, one device per site at a time (a disruption budget).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.contract.bundle import write_bundle
from fleet.access.auth import create_api_key
from fleet.service import FleetService
from fleet.settings import FleetSettings
from simulators.models import make_mlp_onnx
from tests.support.agent_world import Agent, wait_until, write_agent_config
from tests.support.broker import Broker, free_port, start_mosquitto
from tests.support.lifecycle_world import manifest_for
from tests.support.report_signing import DeviceKey
from tests.support.service_world import agent_logs, api_client, rollout_status, start_fleet_service

pytestmark = pytest.mark.integration
DEVICES = {"gw-1": "north", "gw-2": "north", "gw-3": "south"}
PREFIX = "ef-sp"
FAST_HEALTH = {"probation_requests": 0, "probation_seconds": 0.3, "inference_timeout_s": 2.0,
               "traffic": "none"}


@dataclass
class World:
    broker: Broker
    settings: FleetSettings
    service: FleetService
    key: str
    agents: dict[str, Agent]

    @property
    def api(self) -> httpx.Client:
        return api_client(self.settings, self.key, timeout=10)

    def rollout(self, version: str, strategy: dict[str, Any]) -> str:
        with self.api as c:
            res = c.post("/v1/rollouts", json={"model_version_id": f"mlp:{version}", "selector": "env=lab",
                                               "strategy": strategy})
        assert res.status_code == 201, res.text
        return str(res.json()["id"])

    def status(self, rid: str) -> dict[str, Any]:
        with self.api as c:
            return rollout_status(c, rid)

    def reported(self, device: str) -> dict[str, Any]:
        return self.service.store.devices.get(device).reported_state or {}

    def logs(self) -> str:
        return agent_logs(self.agents)


def _agent(root: Path, broker: Broker, repo_root: Path, device: str, site: str) -> Agent:
    """An agent config under the world's root, for `device`."""
    return write_agent_config(device, root / "devices" / device, repo_root / "metadata" / "1.root.json",
                              broker.port, {"env": "lab", "site": site}, Agent, topic_prefix=PREFIX)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("site-policies")
    broker = start_mosquitto(root / "broker")
    settings = FleetSettings(data_dir=root / "fleet", port=free_port(), broker_url=broker.url,
                             topic_prefix=PREFIX)
    settings.import_dir.mkdir(parents=True)
    for seed, version in enumerate(("1.0.0", "2.0.0"), start=1):
        model = make_mlp_onnx(seed)
        write_bundle(manifest_for(version, model, seed, FAST_HEALTH), model,
                     settings.import_dir / f"mlp-{version}.efb")
    service = start_fleet_service(settings)
    w = World(broker, settings, service, create_api_key(service.store, "ops", "operator", "test")[1], {})
    with w.api as c:
        for version in ("1.0.0", "2.0.0"):
            res = c.post("/v1/models/mlp/versions/from-bundle", json={"path": f"mlp-{version}.efb"})
            assert res.status_code == 201, res.text
    for d, site in DEVICES.items():
        service.store.devices.create(d, {"env": "lab", "site": site}, {}, d, "$7$unused", "test")
        w.agents[d] = _agent(root, broker, settings.repo_dir, d, site)
        DeviceKey(d).register(service.store).install(w.agents[d].state_dir)  # as `agent enroll` does
        w.agents[d].start()
    try:
        rid = w.rollout("1.0.0", {"kind": "all_at_once"})
        wait_until(lambda: w.status(rid)["state"] == "completed", 60, f"v1 everywhere\n{w.logs()}")
        yield w
    finally:
        for a in w.agents.values():
            if a.proc is not None and a.proc.poll() is None:
                a.stop()
        service.stop()
        broker.stop()


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
