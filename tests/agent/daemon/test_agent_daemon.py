"""The agent daemon end to end: real Mosquitto, real fleet side, real agent subprocesses.

One fleet side (repository with v1..v4, director signer, publisher) per module; one
long-lived agent (`dev-main`) walks through install, update, a bad update that rolls back by
itself, an operator rollback and refused inputs. Each test first drives the device to the
state it needs, so any single test also runs alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner

from agent.contract.director import canonical_bytes
from agent.contract.telemetry_codec import decode_report
from tests.support.agent_world import (
    ROOT,
    Agent,
    Fleet,
    make_agent,
    reference,
    running_fleet,
    wait_until,
)
from tests.support.lifecycle_world import X

pytestmark = pytest.mark.integration
MAIN = "dev-main"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("agent-daemon")) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def main_agent(fleet: Fleet) -> Iterator[Agent]:
    agent = make_agent(fleet, MAIN).start()
    try:
        yield agent
    finally:
        code = agent.stop()
        assert code == 0, f"agent did not exit cleanly on SIGTERM ({code}):\n{agent.tail()}"


def ensure_active(fleet: Fleet, agent: Agent, bundle_id: str) -> None:
    state = fleet.state(agent.device)
    if state is None or state.active_bundle != bundle_id:
        fleet.issue(agent.device, bundle_id)
        fleet.wait_state(agent.device, bundle_id)
    agent.wait_serving(bundle_id)


def status(agent: Agent) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "agent", "status", "--json", "--config", str(agent.config_path)],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    )
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def test_fresh_device_installs_v1_serves_it_and_reports(fleet: Fleet, main_agent: Agent) -> None:
    # before any director document the local API is up and says "no model" (not a crash)
    wait_until(lambda: main_agent.socket.exists(), 30, "the Unix socket")
    wait_until(lambda: fleet.state(MAIN) is not None, 30, "a first reported state")
    with pytest.raises(Exception, match=r"no .*model"):
        main_agent.predict_unix()

    ensure_active(fleet, main_agent, "mlp-1.0.0")
    np.testing.assert_allclose(main_agent.predict_unix(), reference("mlp-1.0.0"), atol=1e-4)
    np.testing.assert_allclose(main_agent.predict_http(), reference("mlp-1.0.0"), atol=1e-4)
    committed = fleet.wait_event(MAIN, "committed")
    assert committed.bundle_id == "mlp-1.0.0"
    assert fleet.events_of(MAIN, "installed")[0].bundle_id == "mlp-1.0.0"
    reported = fleet.state(MAIN)
    assert reported is not None and reported.online and reported.director_sequence == 1
    assert reported.labels == {"test": "daemon"} and "onnxruntime" in reported.runtimes

    # telemetry: the requests just served arrive as a decodable report for v1
    def served_reports() -> int:
        with fleet.lock:
            reports = [decode_report(p) for p in fleet.telemetry[MAIN]]
        return sum(r.requests for r in reports if r.version == "1.0.0")

    wait_until(lambda: served_reports() >= 2, 20, "telemetry reports counting the served requests")


def test_update_then_bad_update_rolls_back_and_stays_quarantined(fleet: Fleet, main_agent: Agent) -> None:
    ensure_active(fleet, main_agent, "mlp-1.0.0")
    ensure_active(fleet, main_agent, "mlp-2.0.0")
    assert fleet.state(MAIN).previous_bundle == "mlp-1.0.0"  # type: ignore[union-attr]

    n_rolled = len(fleet.events_of(MAIN, "rolled_back"))
    bad_doc = fleet.issue(MAIN, "mlp-3.0.0")
    rolled = fleet.wait_event(MAIN, "rolled_back", n_rolled + 1)
    assert rolled.bundle_id == "mlp-3.0.0"
    assert "golden vectors failed" in rolled.reason
    assert rolled.measurements, "a rollback reports its measurements"
    fleet.wait_state(MAIN, "mlp-2.0.0")
    main_agent.wait_serving("mlp-2.0.0")
    assert "mlp-3.0.0" in status(main_agent)["quarantined"]  # type: ignore[operator]

    # the same document again (a redelivery) does not retry it: a later refused document is
    # the barrier proving the agent has processed the duplicate without starting an update
    started = len(fleet.events_of(MAIN, "update_started"))
    n_refused = len(fleet.events_of(MAIN, "director_refused"))
    fleet.publisher.publish_desired(device_id=MAIN, document=bad_doc)
    fleet.publisher.publish_desired(device_id=MAIN, document=b'{"signed": {}, "signatures": []}')
    fleet.wait_event(MAIN, "director_refused", n_refused + 1)
    assert len(fleet.events_of(MAIN, "update_started")) == started
    assert main_agent.serves("mlp-2.0.0")

    # a *newer* document naming v3 retries it (and it fails again the same way)
    fleet.issue(MAIN, "mlp-3.0.0")
    again = fleet.wait_event(MAIN, "rolled_back", n_rolled + 2)
    assert again.bundle_id == "mlp-3.0.0"
    fleet.wait_state(MAIN, "mlp-2.0.0")
    main_agent.wait_serving("mlp-2.0.0")


def test_operator_rollback_is_a_newer_document_naming_v1_without_download(
    fleet: Fleet, main_agent: Agent
) -> None:
    ensure_active(fleet, main_agent, "mlp-1.0.0")
    ensure_active(fleet, main_agent, "mlp-2.0.0")
    started = len(fleet.events_of(MAIN, "update_started"))
    fleet.issue(MAIN, "mlp-1.0.0")
    fleet.wait_state(MAIN, "mlp-1.0.0")
    main_agent.wait_serving("mlp-1.0.0")
    start = fleet.events_of(MAIN, "update_started")[started]
    assert start.bundle_id == "mlp-1.0.0"
    assert start.measurements.get("sequence", 0) > 0
    # no download: v1 was still in its slot, so the update went straight to staged
    assert not [e for e in fleet.events_of(MAIN, "installed")[1:] if e.bundle_id == "mlp-1.0.0"]


def test_replayed_foreign_and_tampered_inputs_are_refused_and_change_nothing(
    fleet: Fleet, main_agent: Agent, tmp_path: Path
) -> None:
    ensure_active(fleet, main_agent, "mlp-1.0.0")
    old = fleet.issue(MAIN, "mlp-2.0.0")
    fleet.wait_state(MAIN, "mlp-2.0.0")
    ensure_active(fleet, main_agent, "mlp-1.0.0")
    before = main_agent.record()

    refused = len(fleet.events_of(MAIN, "director_refused"))
    # 1. a replay of an older, genuinely signed document
    fleet.publisher.publish_desired(device_id=MAIN, document=old)
    replay = fleet.wait_event(MAIN, "director_refused", refused + 1)
    assert "replayed or stale" in replay.reason
    # 2. a valid document for another device, published on this device's topic
    # (its sequence is made higher than ours, so only the addressee check can refuse it)
    foreign = fleet.issue("dev-other", "mlp-2.0.0", publish=False)
    while fleet.signer.last_sequence(device_id="dev-other") <= fleet.signer.last_sequence(device_id=MAIN):
        foreign = fleet.issue("dev-other", "mlp-2.0.0", publish=False)
    fleet.publisher.publish_desired(device_id=MAIN, document=foreign)
    assert "addressed to device 'dev-other'" in fleet.wait_event(MAIN, "director_refused", refused + 2).reason
    # 3. a document whose signed part was modified after signing
    doc = json.loads(fleet.issue("dev-x", "mlp-2.0.0", publish=False))
    doc["signed"]["device_id"] = MAIN
    fleet.publisher.publish_desired(device_id=MAIN, document=json.dumps(doc).encode())
    assert "signature" in fleet.wait_event(MAIN, "director_refused", refused + 3).reason

    after = main_agent.record()
    assert (after.active, after.previous, after.director_sequence) == (
        before.active,
        before.previous,
        before.director_sequence,
    )
    assert main_agent.serves("mlp-1.0.0")

    # 4. a tampered bundle in the repository: TUF refuses it, the device keeps v1
    bid = fleet.repo.publish("9.0.0", model_seed=1)
    stored = next(fleet.repo.repo.repo_dir.glob("targets/models/mlp/*.mlp-9.0.0.efb"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    rolled = len(fleet.events_of(MAIN, "rolled_back"))
    fleet.issue(MAIN, bid)
    refusal = fleet.wait_event(MAIN, "rolled_back", rolled + 1)
    assert refusal.bundle_id == bid and "refused" in refusal.reason
    fleet.wait_state(MAIN, "mlp-1.0.0")
    assert main_agent.record().active == "mlp-1.0.0"
    assert main_agent.serves("mlp-1.0.0")
    assert np.allclose(main_agent.predict_http(X[:1]), reference("mlp-1.0.0", X[:1]), atol=1e-4)


def test_rotated_director_keys_are_learned_from_a_tuf_refresh(fleet: Fleet, main_agent: Agent) -> None:
    """Runs last: it rotates the module's director keys (a new TUF root carries them)."""
    from fleet.trust.keys import KeyStore

    ensure_active(fleet, main_agent, "mlp-1.0.0")
    refused = len(fleet.events_of(MAIN, "director_refused"))
    # a document signed by a key no root names: refused after one refresh finds nothing new
    stranger = CryptoSigner.generate_ed25519()
    forged = json.loads(fleet.issue(MAIN, "mlp-2.0.0", publish=False))
    payload = canonical_bytes(forged["signed"])
    forged["signatures"] = [stranger.sign(payload).to_dict()]
    fleet.publisher.publish_desired(device_id=MAIN, document=json.dumps(forged).encode())
    assert "unknown key" in fleet.wait_event(MAIN, "director_refused", refused + 1).reason
    assert main_agent.record().active == "mlp-1.0.0"

    # the fleet rotates its director key: root v2 names the new key, the device has only v1
    KeyStore(fleet.root / "keys").rotate("director")
    fleet.repo.repo.rotate_root()
    fleet.issue(MAIN, "mlp-2.0.0")
    fleet.wait_state(MAIN, "mlp-2.0.0")
    main_agent.wait_serving("mlp-2.0.0")
    root = json.loads((main_agent.state_dir / "tuf" / "metadata" / "root.json").read_text())
    assert root["signed"]["version"] == 2
    assert len(fleet.events_of(MAIN, "director_refused")) == refused + 1
