"""A delta over MQTT: real Mosquitto, the fleet side's repository and signer, a real agent process.

The agent runs v1 and reports the `delta` feature; the fleet publishes a delta v1 -> v2 as a TUF
target and names it in the director document. The agent fetches the delta (chunked, TUF-verified,
through the MQTT fetcher), rebuilds v2 and commits it, saying so in a `delta_applied` event.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from agent.contract.director import DeltaRef
from fleet.registry.deltas import build_delta
from tests.support.agent_world import make_agent, running_fleet

pytestmark = pytest.mark.integration


def test_agent_applies_a_delta_over_mqtt(tmp_path: Path) -> None:
    with running_fleet(tmp_path / "world") as fleet:
        agent = make_agent(fleet, "dev-delta").start()
        try:
            fleet.issue(agent.device, "mlp-1.0.0")
            state = fleet.wait_state(agent.device, "mlp-1.0.0")
            assert "delta" in state.features
            repo = fleet.repo.repo
            v1, v2 = (repo.target_ref(fleet.repo.refs[b].path) for b in ("mlp-1.0.0", "mlp-2.0.0"))

            def local(path: str, sha: str) -> Path:
                d, _, n = path.rpartition("/")
                return repo.targets_dir / d / f"{sha}.{n}"

            built = build_delta(local(v1.path, v1.sha256), local(v2.path, v2.sha256))
            with tempfile.TemporaryDirectory() as scratch:
                src = Path(scratch) / "d.efd"
                src.write_bytes(built.data)
                ref = repo.add_target(src, "deltas/mlp/mlp-2.0.0.from-1.0.0.efd",
                                      {"delta_of": v2.path, "base_bundle": "mlp-1.0.0",
                                       "base_sha256": v1.sha256, "format": built.format})
            delta = DeltaRef(path=ref.path, length=ref.length, sha256=ref.sha256, base_bundle="mlp-1.0.0",
                             base_sha256=v1.sha256, format=built.format)  # type: ignore[arg-type]
            doc = fleet.signer.issue(v2, device_id=agent.device, delta=delta)
            fleet.publisher.publish_desired(device_id=agent.device, document=doc)
            fleet.wait_state(agent.device, "mlp-2.0.0")
            ev = fleet.wait_event(agent.device, "delta_applied")
            assert ev.bundle_id == "mlp-2.0.0" and ev.measurements["fetched_bytes"] == ref.length
            assert not fleet.events_of(agent.device, "delta_fallback")
        finally:
            assert agent.stop() == 0, agent.tail()
