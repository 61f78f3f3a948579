"""Sealed bundles end to end: the real fleet service over a private Mosquitto, real agent processes.

Two agents with wrap keys (made as `agent enroll` makes them, registered as enrollment does): a
plain v1 reaches both; v2 is published through the API sealed for `site=lab` only. The lab agent
downloads the ciphertext over MQTT, unwraps its key and serves v2; the field agent, outside the
cohort, refuses it (`BundleNotForThisDeviceError`), keeps serving v1 from unchanged slots and
reports the refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from agent.contract.envelope import public_key_raw
from agent.trust.wrap_key import create_wrap_key, load_wrap_key
from fleet.devices.wrap_keys import store_wrap_key
from fleet.service import FleetService
from simulators.models import make_mlp_onnx, mlp_reference, mlp_weights
from tests.support.agent_world import Agent, wait_until
from tests.support.lifecycle_world import X
from tests.support.service_world import ServiceWorld

pytestmark = pytest.mark.integration
PREFIX = "ef-seal"
HEALTH = {"probation_requests": 0, "probation_seconds": 0.2, "inference_timeout_s": 2.0, "traffic": "none"}
SEEDS = {"1.0.0": 1, "2.0.0": 2}
DEVICES = {"gw-lab": "lab", "gw-field": "field"}


class World(ServiceWorld[Agent]):
    API_TIMEOUT = 30.0
    LOG_LINES = 12

    def rollout(self, version: str, selector: str) -> str:
        return self.create_rollout(version, selector, {"kind": "all_at_once", "bake_s": 0})

    def state(self, rid: str) -> str:
        return str(self.status(rid)["state"])


def _serves(agent: Agent, version: str) -> bool:
    try:
        want = mlp_reference(X, mlp_weights(SEEDS[version]))
        return bool(np.allclose(agent.predict_unix(), want, atol=1e-4))
    except Exception:
        return False


def _wrap_key(service: FleetService) -> Callable[[Agent], object]:
    """Give an agent a wrap key before it starts, as enrollment does (`add_agent` adds its report key)."""

    def make(agent: Agent) -> None:
        public = create_wrap_key(agent.state_dir)  # what `agent enroll` does ...
        store_wrap_key(service.store, agent.device, public)  # ... and what the fleet records of it

    return make


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World.open(tmp_path_factory.mktemp("sealed-agents"), PREFIX,
                   {version: (seed, seed) for version, seed in SEEDS.items()}, HEALTH, Agent)
    for device, site in DEVICES.items():
        w.add_agent(device, {"site": site}, before_start=_wrap_key(w.service))
    try:
        w.register_bundle("1.0.0")
        rid = w.rollout("1.0.0", "site in (lab, field)")
        wait_until(lambda: w.state(rid) == "completed", 90, f"v1 rollout completed\n{w.logs()}")
        for a in w.agents.values():
            wait_until(lambda a=a: _serves(a, "1.0.0"), 30, f"{a.device} serving v1\n{w.logs()}")  # type: ignore[misc]
        yield w
    finally:
        w.close()


def test_the_cohort_runs_the_sealed_model_and_a_device_outside_refuses_it(world: World) -> None:
    with world.api as c:
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
