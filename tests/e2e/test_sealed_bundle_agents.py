"""Sealed bundles end to end: the real fleet service over a private Mosquitto, real agent processes.

Two agents with wrap keys (made as `agent enroll` makes them, registered as enrollment does): a
plain v1 reaches both; v2 is published through the API sealed for `site=lab` only. The lab agent
downloads the ciphertext over MQTT, unwraps its key and serves v2; the field agent, outside the
cohort, refuses it (`BundleNotForThisDeviceError`), keeps serving v1 from unchanged slots and
reports the refusal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.contract.bundle import write_bundle
from agent.contract.envelope import public_key_raw
from agent.trust.wrap_key import create_wrap_key, load_wrap_key
from fleet.access.auth import create_api_key
from fleet.devices.wrap_keys import store_wrap_key
from fleet.service import FleetService
from fleet.settings import FleetSettings
from simulators.models import make_mlp_onnx, mlp_reference, mlp_weights
from tests.support.agent_world import Agent, wait_until, write_agent_config
from tests.support.broker import Broker, free_port, start_mosquitto
from tests.support.lifecycle_world import X, manifest_for
from tests.support.report_signing import DeviceKey
from tests.support.service_world import agent_logs, api_client, rollout_status, start_fleet_service

pytestmark = pytest.mark.integration
PREFIX = "ef-seal"
HEALTH = {"probation_requests": 0, "probation_seconds": 0.2, "inference_timeout_s": 2.0, "traffic": "none"}
SEEDS = {"1.0.0": 1, "2.0.0": 2}
DEVICES = {"gw-lab": "lab", "gw-field": "field"}


@dataclass
class World:
    broker: Broker
    settings: FleetSettings
    service: FleetService
    key: str
    agents: dict[str, Agent]

    def api(self) -> httpx.Client:
        return api_client(self.settings, self.key, timeout=30)

    def rollout(self, version: str, selector: str) -> str:
        with self.api() as c:
            res = c.post("/v1/rollouts", json={"model_version_id": f"mlp:{version}", "selector": selector,
                                               "strategy": {"kind": "all_at_once", "bake_s": 0}})
        assert res.status_code == 201, res.text
        return str(res.json()["id"])

    def state(self, rid: str) -> str:
        with self.api() as c:
            return str(rollout_status(c, rid)["state"])

    def logs(self) -> str:
        return agent_logs(self.agents, 12)


def _serves(agent: Agent, version: str) -> bool:
    try:
        want = mlp_reference(X, mlp_weights(SEEDS[version]))
        return bool(np.allclose(agent.predict_unix(), want, atol=1e-4))
    except Exception:
        return False


def _agent(root: Path, broker: Broker, repo_root: Path, device: str, site: str) -> Agent:
    """An agent config under the world's root, for `device`."""
    return write_agent_config(device, root / "devices" / device, repo_root / "metadata" / "1.root.json",
                              broker.port, {"site": site}, Agent, topic_prefix=PREFIX)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("sealed-agents")
    broker = start_mosquitto(root / "broker")
    settings = FleetSettings(data_dir=root / "fleet", port=free_port(), broker_url=broker.url,
                             topic_prefix=PREFIX)
    settings.import_dir.mkdir(parents=True)
    for version, seed in SEEDS.items():
        model = make_mlp_onnx(seed)
        write_bundle(manifest_for(version, model, seed, HEALTH), model,
                     settings.import_dir / f"mlp-{version}.efb")
    service = start_fleet_service(settings)
    w = World(broker, settings, service, create_api_key(service.store, "ops", "operator", "test")[1], {})
    for device, site in DEVICES.items():
        service.store.devices.create(device, {"site": site}, {}, device, "$7$unused", "test")
        agent = _agent(root, broker, settings.repo_dir, device, site)
        public = create_wrap_key(agent.state_dir)  # what `agent enroll` does ...
        store_wrap_key(service.store, device, public)  # ... and what the fleet records of it
        DeviceKey(device).register(service.store).install(agent.state_dir)  # its report key, likewise
        w.agents[device] = agent.start()
    try:
        with w.api() as c:
            res = c.post("/v1/models/mlp/versions/from-bundle", json={"path": "mlp-1.0.0.efb"})
            assert res.status_code == 201, res.text
        rid = w.rollout("1.0.0", "site in (lab, field)")
        wait_until(lambda: w.state(rid) == "completed", 90, f"v1 rollout completed\n{w.logs()}")
        for a in w.agents.values():
            wait_until(lambda a=a: _serves(a, "1.0.0"), 30, f"{a.device} serving v1\n{w.logs()}")  # type: ignore[misc]
        yield w
    finally:
        for a in w.agents.values():
            if a.proc is not None and a.proc.poll() is None:
                a.stop()
        service.stop()
        broker.stop()


def test_the_cohort_runs_the_sealed_model_and_a_device_outside_refuses_it(world: World) -> None:
    with world.api() as c:
        res = c.post("/v1/models/mlp/versions/from-bundle/sealed",
                     json={"path": "mlp-2.0.0.efb", "selector": "site=lab"})
    assert res.status_code == 201, res.text
    assert res.json()["wrap"]["devices"] == ["gw-lab"]
    needle = make_mlp_onnx(SEEDS["2.0.0"])[2048:2112]
    assert not [p for p in world.settings.repo_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]

    lab = world.agents["gw-lab"]
    rid = world.rollout("2.0.0", "site=lab")
    wait_until(lambda: world.state(rid) == "completed", 90, f"v2 rollout to the lab\n{world.logs()}")
    wait_until(lambda: _serves(lab, "2.0.0"), 30, f"gw-lab serving the sealed v2\n{world.logs()}")
    assert lab.record().active == "mlp-2.0.0"

    field = world.agents["gw-field"]
    slots = field.state_dir / "lifecycle" / "bundles"
    before = sorted(p.name for p in slots.iterdir())
    world.rollout("2.0.0", "site=field")
    wait_until(lambda: "mlp-2.0.0" in field.record().quarantined, 90, f"gw-field refusing v2\n{world.logs()}")
    record = field.record()
    assert record.active == "mlp-1.0.0" and _serves(field, "1.0.0")
    assert sorted(p.name for p in slots.iterdir()) == before
    log = field.log.read_text(errors="replace")
    assert "BundleNotForThisDeviceError" in log and "outside its cohort" in log
    assert public_key_raw(load_wrap_key(field.state_dir).public_key())  # a good key, just not a recipient
