"""The swarm: real agents over worker processes against a real Mosquitto and the fleet's own parts.

One module-scoped world (broker, fleet side, 6 devices over 2 worker processes, one of them
ONNX-only); each test drives it one step further, so the order below is the story: install,
telemetry, a runtime the device lacks, a worker killed mid-install.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contract.telemetry_codec import decode_report
from simulators.broker import ManagedBroker
from simulators.sim_fleet import SimFleet
from simulators.swarm import Swarm, make_profiles
from simulators.swarm_records import SwarmSpec

pytestmark = pytest.mark.integration
N = 6


class World:
    def __init__(self, root: Path) -> None:
        self.broker = ManagedBroker(root / "broker").start()
        self.fleet = SimFleet(root / "fleet", self.broker.host, self.broker.port, prefix="tsw").start()
        self.profiles = make_profiles(N, onnx_only_share=1 / 3)
        spec = SwarmSpec(
            self.broker.host, self.broker.port, "tsw", self.fleet.bootstrap_root, root / "devices",
            telemetry_interval_s=1.0, traffic_interval_s=0.2,
        )
        self.swarm = Swarm(spec, self.profiles, processes=2).start()

    @property
    def ids(self) -> list[str]:
        return self.swarm.device_ids

    def wait_all_on(self, bundle_id: str, timeout: float = 60) -> None:
        ok = self.fleet.wait(lambda: len(self.fleet.devices_on(bundle_id, self.ids)) == N, timeout)
        assert ok, f"not all on {bundle_id}: {self.fleet.active_counts(self.ids)}"

    def stop(self) -> None:
        self.swarm.stop()
        self.fleet.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("swarm"))
    try:
        assert w.swarm.wait_connected(30)
        yield w
    finally:
        w.stop()


def test_every_device_installs_and_devices_of_a_worker_share_one_session(world: World) -> None:
    v1 = world.fleet.publish_bundle("1.0.0", model_seed=1)
    for cohort in ("eu", "us"):
        world.fleet.assign(v1.bundle_id, cohort=cohort)
    world.wait_all_on(v1.bundle_id)
    stats = world.swarm.stats()
    assert [s.devices for s in stats] == [3, 3]
    assert all(s.connected == 3 for s in stats)
    assert all(s.sessions == 1 for s in stats)  # three devices, one onnxruntime session per worker
    # each device keeps its own state: slots and state record in its own directory
    for d in world.ids:
        assert (world.swarm.spec.state_root / d / "lifecycle" / "state.json").is_file()


def test_devices_report_their_profile_and_send_telemetry(world: World) -> None:
    onnx_only = {p.device_id for p in world.profiles if p.runtimes == ("onnx",)}
    assert len(onnx_only) == 2
    for d in world.ids:
        st = world.fleet.reported[d]
        assert st.runtimes == (["onnxruntime"] if d in onnx_only else ["onnxruntime", "litert"])
        assert st.labels["cohort"] in ("eu", "us")
    assert world.fleet.wait(lambda: world.fleet.ingest_results["accepted"] >= N, 30)
    assert world.fleet.ingest_results["rejected"] == 0
    report = world.fleet.on_store(lambda s: s.windows("mlp", "1.0.0"))[0]["report"]
    assert report.model == "mlp" and decode_report  # a merged, decodable window


def test_a_litert_bundle_is_refused_by_devices_without_litert(world: World) -> None:
    v2 = world.fleet.publish_bundle("2.0.0", model_seed=1, runtime="tflite")
    onnx_only = [p.device_id for p in world.profiles if p.runtimes == ("onnx",)]
    others = [d for d in world.ids if d not in onnx_only]
    since = time.time()
    for cohort in ("eu", "us"):
        world.fleet.assign(v2.bundle_id, cohort=cohort)
    assert world.fleet.wait(lambda: len(world.fleet.devices_on(v2.bundle_id, others)) == len(others), 60)

    def refused() -> set[str]:
        f = world.fleet
        evs = f.events_of("rolled_back", onnx_only) + f.events_of("update_failed", onnx_only)
        return {e.device_id for e in evs if e.bundle_id == v2.bundle_id and e.timestamp >= since}

    assert world.fleet.wait(lambda: refused() == set(onnx_only), 60)
    assert world.fleet.wait(lambda: len(world.fleet.devices_on("mlp-1.0.0", onnx_only)) == len(onnx_only), 30)


def test_a_worker_killed_mid_install_resumes_after_restart(world: World) -> None:
    v3 = world.fleet.publish_bundle("3.0.0", model_seed=3)
    victims = set(world.swarm.workers[0].profiles[i].device_id for i in range(3))
    for cohort in ("eu", "us"):
        world.fleet.assign(v3.bundle_id, cohort=cohort)
    # kill as soon as one of the worker's devices started the update
    def started_update() -> bool:
        return any(e.bundle_id == v3.bundle_id for e in world.fleet.events_of("update_started", victims))

    started = world.fleet.wait(started_update, 30, 0.01)
    assert started
    killed = world.swarm.kill_worker(0)
    assert set(killed) == victims
    assert world.fleet.wait(lambda: world.fleet.online(victims) == 0, 30)  # Last Wills
    world.swarm.restart_worker(0)
    world.wait_all_on(v3.bundle_id, 90)
    assert world.fleet.online(world.ids) == N

