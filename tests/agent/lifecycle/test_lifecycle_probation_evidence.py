"""Probation commits on evidence only: answered requests, or golden vectors under traffic "none".

The case behind it: a rollout moved devices to a model with another input schema; every
client call then failed with 400 `invalid_input`, probation did not count those, and after
`probation_max_wait_s` with zero successful requests the device committed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.contract.manifest import HealthPolicy
from agent.errors import InputValidationError
from agent.lifecycle import State
from agent.lifecycle.health import Probation
from agent.serving.model_holder import ModelHolder
from tests.support.lifecycle_world import Repo, X, make_device, make_repo

#: traffic required (the default), a short window so the tests do not wait
NEEDS_TRAFFIC = {"probation_requests": 20, "probation_seconds": 0.0, "inference_timeout_s": 2.0}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    r = make_repo(tmp_path_factory.mktemp("repo"))
    r.publish("1.0.0", model_seed=0)  # FAST: traffic "none"
    r.publish("2.0.0", model_seed=1, health=NEEDS_TRAFFIC)
    r.publish("3.0.0", model_seed=2, health={**NEEDS_TRAFFIC, "probation_requests": 100,
                                            "probation_seconds": 0.2, "traffic": "none"})
    return r


class Clients:
    """Threads calling the holder the whole time, as the device's applications do."""

    def __init__(self, holder: ModelHolder, x: np.ndarray) -> None:
        self.holder, self.x = holder, x
        self.rejected = self.ok = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.holder.predict({"x": self.x})
                self.ok += 1
            except InputValidationError:
                self.rejected += 1
            time.sleep(0.001)

    def __enter__(self) -> Clients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _installed(repo: Repo, tmp_path: Path, **config):  # type: ignore[no-untyped-def]
    dev = make_device(repo, tmp_path / "dev", **config)
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0"))
    assert dev.lifecycle.start() is State.IDLE and dev.lifecycle.record.active == "mlp-1.0.0"
    return dev


@pytest.mark.integration
def test_clients_that_all_get_invalid_input_roll_the_update_back(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path, probation_max_wait_s=30.0)
    wrong_schema = np.zeros((1, 6), np.float32)  # clients of a 6-input model; this one takes 32
    with Clients(dev.holder, wrong_schema) as clients:
        dev.lifecycle.offer_desired(repo.desired("mlp-2.0.0"))
        dev.lifecycle.run_until_stable()
    rec = dev.lifecycle.record
    assert rec.active == "mlp-1.0.0" and "mlp-2.0.0" in rec.quarantined
    assert clients.ok == 0 and clients.rejected > 0
    rolled = dev.event("rolled_back")
    assert "rejected as invalid input" in rolled["reason"], rolled["reason"]
    assert rolled["measurements"]["rejected"] >= 1 and rolled["measurements"]["successful"] == 0
    names = dev.names()
    assert names[len(names) - names[::-1].index("update_started"):] == ["staged", "activated", "rolled_back"]
    dev.holder.close()


@pytest.mark.integration
def test_no_traffic_under_the_default_policy_rolls_back_instead_of_committing(
    repo: Repo, tmp_path: Path
) -> None:
    dev = _installed(repo, tmp_path, probation_max_wait_s=0.3)
    dev.lifecycle.offer_desired(repo.desired("mlp-2.0.0"))
    dev.lifecycle.run_until_stable()
    rec = dev.lifecycle.record
    assert rec.active == "mlp-1.0.0" and "mlp-2.0.0" in rec.quarantined
    reason = dev.event("rolled_back")["reason"]
    assert "no evidence: 0 successful requests" in reason and "needs 10" in reason, reason
    dev.holder.close()


@pytest.mark.integration
def test_answered_traffic_commits_under_the_default_policy(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path, probation_max_wait_s=30.0)
    with Clients(dev.holder, X[:1]):
        dev.lifecycle.offer_desired(repo.desired("mlp-2.0.0"))
        dev.lifecycle.run_until_stable()
    assert dev.lifecycle.record.active == "mlp-2.0.0"
    assert dev.event("committed")["measurements"]["successful"] >= 10
    dev.holder.close()


@pytest.mark.integration
def test_traffic_none_commits_on_golden_vectors_without_any_request(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path, probation_max_wait_s=0.3)
    dev.lifecycle.offer_desired(repo.desired("mlp-3.0.0"))
    dev.lifecycle.run_until_stable()
    assert dev.lifecycle.record.active == "mlp-3.0.0"
    assert dev.event("activated")["measurements"]["golden_vectors"] == len(X)
    committed = dev.event("committed")["measurements"]
    assert committed["requests"] == 0
    dev.holder.close()


@pytest.mark.unit
def test_probation_counts_rejections_and_needs_successes() -> None:
    now = [0.0]

    def probation(**policy: object) -> Probation:
        return Probation(HealthPolicy(**policy), clock=lambda: now[0], rss_mb=lambda: 1.0,  # type: ignore[arg-type]
                         max_wait_s=5.0)

    p = probation(probation_requests=0, probation_seconds=0.0)
    p.observe_rejected()  # the first rejection spends a zero-request window's budget
    v = p.verdict()
    assert v is not None and not v.ok and "1 of 1 requests rejected as invalid input" in v.reason
    thin = probation(probation_requests=0, probation_seconds=0.0)
    for _ in range(3):
        thin.observe(0.001, True)
    assert thin.verdict() is None  # 3 of the 10 answered requests the default needs: waits
    now[0] = 5.0
    v = thin.verdict()
    assert v is not None and not v.ok and "no evidence: 3 successful requests" in v.reason
    enough = probation(probation_requests=0, probation_seconds=0.0, min_successful_requests=3)
    for _ in range(3):
        enough.observe(0.001, True)
    v = enough.verdict()
    assert v is not None and v.ok and v.measurements["successful"] == 3
