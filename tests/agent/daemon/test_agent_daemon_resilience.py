"""The agent daemon under crashes, broker loss and shadow mode (real processes, real broker).

- SIGKILL at every lifecycle state of an install (started through `tests.support.kill_at`,
  the daemon kills itself right after the record with that state is on disk); after a
  restart it always ends up serving a verified model: the new one committed, or the previous one.
- Broker gone: the agent keeps serving, a restarted agent serves from disk, the Last Will
  marks a killed agent offline, and it reports again once the broker is back.
- Shadow mode: the candidate runs on copies of requests, agreement is reported, its outputs
  are never served.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from functools import partial

import numpy as np
import pytest

from agent.lifecycle.state_store import StateRecord
from tests.support.agent_world import (
    Agent,
    Fleet,
    clone_state,
    make_agent,
    reference,
    running_fleet,
    wait_until,
)

pytestmark = pytest.mark.integration

#: state to die in -> the bundle the device must serve after the restart
KILL_EXPECT = {
    "downloading": "mlp-2.0.0",
    "verifying": "mlp-2.0.0",
    "staged": "mlp-2.0.0",
    "activating": "mlp-2.0.0",
    "probation": "mlp-1.0.0",  # the new model may be what crashed us: roll back
    "committed": "mlp-2.0.0",
    "rolling_back": "mlp-1.0.0",  # dying while rolling back a bad v3 still ends on v1
    "failed": "mlp-1.0.0",  # a download that fails (target file gone): keep v1, retry later
}
#: which bundle each kill scenario installs (default v2)
KILL_TARGET = {"rolling_back": "mlp-3.0.0", "failed": "mlp-5.0.0"}


def _idle_record(agent: Agent) -> StateRecord | None:
    record = agent.record()
    return record if record.state == "idle" else None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("agent-resilience")) as fleet:
        yield fleet


@pytest.mark.slow  # kill -9 and restart: the long step (see pyproject's markers)
def test_sigkill_in_every_lifecycle_state_ends_serving_a_verified_model(fleet: Fleet) -> None:
    # a device provisioned with v1, cloned once per state (cheaper than installing v1 seven times)
    template = make_agent(fleet, "dev-tmpl", http=False).start()
    fleet.issue(template.device, "mlp-1.0.0")
    fleet.wait_state(template.device, "mlp-1.0.0")
    assert template.stop() == 0

    # v5 is signed in TUF but its file is missing on the repository: the publisher answers 404
    fleet.repo.publish("5.0.0", model_seed=1)
    next(fleet.repo.repo.repo_dir.glob("targets/models/mlp/*.mlp-5.0.0.efb")).unlink()

    agents: dict[str, Agent] = {}
    for state in KILL_EXPECT:
        device = f"dev-kill-{state.replace('_', '-')}"
        clone_state(template.state_dir, fleet.root / "devices" / device)
        agents[state] = make_agent(fleet, device, http=False, state_dir=fleet.root / "devices" / device)
        agents[state].start(kill_at=state)
    for state, agent in agents.items():
        fleet.issue(agent.device, KILL_TARGET.get(state, "mlp-2.0.0"))

    for state, agent in agents.items():
        assert agent.proc is not None
        code = agent.proc.wait(60)
        assert code == -signal.SIGKILL, f"{agent.device} exited {code}, not killed:\n{agent.tail()}"
        assert agent.record().state == state, "the record on disk names the state it died in"

    for agent in agents.values():
        agent.start()
    try:
        for state, agent in agents.items():
            want = KILL_EXPECT[state]
            fleet.wait_state(agent.device, want, timeout=60)
            agent.wait_serving(want)
            # (the "failed" device keeps retrying its download, so catch it between attempts)
            record = wait_until(partial(_idle_record, agent), 30, f"{agent.device} idle")
            assert record.active == want
            assert np.allclose(agent.predict_unix(), reference(want), atol=1e-4)
            if want == "mlp-2.0.0":
                assert record.previous == "mlp-1.0.0" and not record.quarantined
            elif state == "failed":
                failed = fleet.wait_event(agent.device, "update_failed")
                assert failed.bundle_id == "mlp-5.0.0" and "download failed" in failed.reason
                assert not record.quarantined  # a transport failure is retried, not quarantined
            else:
                bad = KILL_TARGET.get(state, "mlp-2.0.0")
                assert record.previous is None and bad in record.quarantined
                rolled = fleet.wait_event(agent.device, "rolled_back")
                assert rolled.bundle_id == bad and rolled.reason
            recovered = fleet.wait_event(agent.device, "crash_recovered")
            assert state in recovered.reason
    finally:
        for agent in agents.values():
            assert agent.stop() == 0, agent.tail()


def test_shadow_candidate_is_compared_but_never_served(fleet: Fleet) -> None:
    agent = make_agent(fleet, "dev-shadow", http=False).start()
    try:
        fleet.issue(agent.device, "mlp-1.0.0", shadow="mlp-4.0.0")
        fleet.wait_state(agent.device, "mlp-1.0.0")
        started = fleet.wait_event(agent.device, "shadow_started")
        assert started.bundle_id == "mlp-4.0.0"
        for _ in range(25):
            out = agent.predict_unix()
            assert np.allclose(out, reference("mlp-1.0.0"), atol=1e-4)
            assert not np.allclose(out, reference("mlp-4.0.0"), atol=1e-2)

        def report_after_requests() -> object:
            return [
                e for e in fleet.events_of(agent.device, "shadow_report") if e.measurements["offered"] >= 25
            ]

        report = wait_until(report_after_requests, 20, "a shadow report covering the requests")[-1]
        assert report.bundle_id == "mlp-4.0.0" and report.previous_bundle_id == "mlp-1.0.0"
        m = report.measurements
        assert m["compared"] + m["dropped"] + m["errors"] <= m["offered"]
        assert "label_agreement" in m and 0.0 <= m["label_agreement"] <= 1.0
        assert "latency_p50_ms" in m
        assert agent.record().active == "mlp-1.0.0" and agent.record().shadow == "mlp-4.0.0"
    finally:
        assert agent.stop() == 0, agent.tail()


def test_broker_loss_keeps_serving_and_restart_serves_from_disk(fleet: Fleet) -> None:
    """Runs last in this module: it stops the module's broker (retained messages are lost)."""
    agent = make_agent(fleet, "dev-off").start()
    try:
        fleet.issue(agent.device, "mlp-1.0.0")
        fleet.wait_state(agent.device, "mlp-1.0.0")
        agent.wait_serving("mlp-1.0.0")

        # killed outright: the broker publishes the Last Will, the fleet sees it offline
        agent.stop(signal.SIGKILL)
        wait_until(lambda: not fleet.state(agent.device).online, 20, "the Last Will")  # type: ignore[union-attr]
        agent.start()
        fleet.wait_state(agent.device, "mlp-1.0.0")

        # broker gone: the agent keeps serving on both local transports
        fleet.broker.stop()
        for _ in range(5):
            assert np.allclose(agent.predict_unix(), reference("mlp-1.0.0"), atol=1e-4)
            assert np.allclose(agent.predict_http(), reference("mlp-1.0.0"), atol=1e-4)
        assert agent.stop() == 0, agent.tail()

        # restarted with no broker at all: serves its verified model from disk
        agent.start()
        agent.wait_serving("mlp-1.0.0")
        assert np.allclose(agent.predict_http(), reference("mlp-1.0.0"), atol=1e-4)
        assert "agent.serving_from_disk" in agent.log.read_text()

        # broker back: it reconnects by itself and reports again
        with fleet.lock:
            fleet.reported.pop(agent.device, None)
        fleet.broker.restart()
        fleet.wait_state(agent.device, "mlp-1.0.0", timeout=30)
    finally:
        if fleet.broker.proc.poll() is not None:
            fleet.broker.restart()
        assert agent.stop() == 0, agent.tail()


def test_events_made_offline_survive_a_crash_and_arrive_after_reconnect(fleet: Fleet) -> None:
    """Runs after the broker-loss test (it stops and restarts the module's broker too)."""
    agent = make_agent(fleet, "dev-outbox", http=False).start()
    fleet.issue(agent.device, "mlp-1.0.0")
    fleet.wait_state(agent.device, "mlp-1.0.0")
    assert agent.stop() == 0
    # die in probation of v2 while the broker is up...
    agent.start(kill_at="probation")
    fleet.issue(agent.device, "mlp-2.0.0")
    assert agent.proc is not None and agent.proc.wait(60) == -signal.SIGKILL
    # ...then recover with no broker: the rollback happens offline, and the agent dies again
    fleet.broker.stop()
    try:
        agent.start()
        agent.wait_serving("mlp-1.0.0")
        wait_until(
            lambda: (r := agent.record()).state == "idle" and "mlp-2.0.0" in r.quarantined, 30, "rollback"
        )
        agent.stop(signal.SIGKILL)
        assert not fleet.events_of(agent.device, "rolled_back")
    finally:
        fleet.broker.restart()
        fleet.wait_listening()  # else the broker drops events sent before the fleet re-subscribes
    agent.start()
    try:
        rolled = fleet.wait_event(agent.device, "rolled_back")
        assert rolled.bundle_id == "mlp-2.0.0" and "probation" in rolled.reason
        recovered = fleet.wait_event(agent.device, "crash_recovered")
        kinds = fleet.event_types(agent.device)
        assert kinds.index("crash_recovered") < kinds.index("rolled_back")  # sent in order
        assert recovered.seq < rolled.seq
    finally:
        assert agent.stop() == 0, agent.tail()
