"""The collection driver: the policy goes into signed documents only for devices running the
version, only while drift is open for `only_while_drift`, is withdrawn after, and a broker
failure between persisting and publishing is resumed on the next tick."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.contract.collect import CollectPolicy
from agent.contract.director import TargetRef
from fleet.collection.driver import CollectionDriver, drift_episode_open
from fleet.collection.records import CollectionStore, make_policy
from fleet.devices.selector import Selector
from fleet.errors import FleetTransportError
from fleet.registry.datasets import DatasetStore
from fleet.telemetry.alerts import AlertManager
from tests.support.fakes import FakeClock

REF = TargetRef(path="models/m/m-1.0.0.efb", length=10, sha256="b" * 64, name="m", version="1.0.0")
RUNS = {"d1": "m-1.0.0", "d2": "m-1.0.0", "d3": "m-0.9.0"}


class FakeDevices:
    def ids_matching(self, selector: Selector, include_revoked: bool = False) -> list[str]:
        return sorted(RUNS)

    def get(self, device_id: str) -> Any:
        return SimpleNamespace(reported_state={"active_bundle": RUNS[device_id]})


@dataclass
class Signed:
    sent: list[tuple[str, CollectPolicy | None]] = field(default_factory=list)
    fail: bool = False

    def issue(self, target: TargetRef, device_id: str | None = None, *, ttl: timedelta = timedelta(days=1),
              reason: str = "", collect: CollectPolicy | None = None) -> bytes:
        assert target == REF
        self.pending = (str(device_id), collect)
        return b"doc"

    def publish_desired(self, device_id: str | None = None, cohort: str | None = None, *,
                        document: bytes) -> str:
        if self.fail:
            raise FleetTransportError("broker down")
        self.sent.append(self.pending)
        return "topic"


def _driver(tmp_path: Path, drift: list[bool]) -> tuple[CollectionDriver, CollectionStore, Signed, FakeClock]:
    clock = FakeClock()
    collections = CollectionStore(DatasetStore(tmp_path / "t.db", clock).database, clock)
    models = SimpleNamespace(get_version=lambda m, v: SimpleNamespace(bundle_target=REF.path))
    store = SimpleNamespace(models=models, devices=FakeDevices())
    signed = Signed()
    repo = SimpleNamespace(target_ref=lambda path: REF)
    driver = CollectionDriver(collections, store, repo, signed, signed,  # type: ignore[arg-type]
                              lambda m, v: drift[0], clock, upload_grace_s=5)
    return driver, collections, signed, clock


@pytest.mark.integration
def test_only_while_drift_signs_the_policy_out_and_withdraws_it(tmp_path: Path) -> None:
    drift = [False]
    driver, collections, signed, clock = _driver(tmp_path, drift)
    start = clock()
    policy = make_policy("col-1", only_while_drift=True, max_seconds=30)
    collections.create("m", "1.0.0", "site=lab", policy, "ops")
    assert driver.tick() == 0 and signed.sent == []
    assert collections.get("col-1").status == "waiting_for_drift"
    drift[0] = True
    assert driver.tick() == 2  # d3 runs another version: left alone
    assert signed.sent == [("d1", policy), ("d2", policy)]
    c = collections.get("col-1")
    assert (c.status, c.applied, c.devices, c.closes_at) == ("collecting", "collecting", ("d1", "d2"),
                                                                start + 35)
    assert driver.tick() == 0  # nothing new
    drift[0] = False
    assert driver.tick() == 2
    assert signed.sent[2:] == [("d1", None), ("d2", None)]  # the episode ended: withdrawn
    assert collections.get("col-1").applied == "waiting_for_drift"


@pytest.mark.integration
def test_a_broker_failure_after_the_status_is_persisted_is_retried(tmp_path: Path) -> None:
    driver, collections, signed, clock = _driver(tmp_path, [False])
    collections.create("m", "1.0.0", "", make_policy("col-2", max_seconds=10), "ops")
    signed.fail = True
    assert driver.tick() == 0
    c = collections.get("col-2")
    assert (c.status, c.applied) == ("collecting", "none")  # persisted first, not yet applied
    signed.fail = False
    assert driver.tick() == 2 and collections.get("col-2").applied == "collecting"
    clock.advance(16)  # max_seconds + grace
    assert driver.tick() == 2 and collections.get("col-2").status == "closed"
    assert [p for _, p in signed.sent[2:]] == [None, None]
    collections.create("m", "1.0.0", "", make_policy("col-3"), "ops")
    driver.tick()
    collections.stop("col-3")
    driver.tick()
    assert collections.get("col-3").applied == "stopped"
    assert [p for _, p in signed.sent[-2:]] == [None, None]


@pytest.mark.integration
def test_drift_episode_open_reads_the_alert_managers_open_episodes(tmp_path: Path) -> None:
    alerts = AlertManager(tmp_path / "alerts.db")
    try:
        assert not drift_episode_open(alerts, "m", "1.0.0")
        with alerts.database.tx() as db:
            db.insert("drift_episodes", {"model": "m", "version": "1.0.0", "cohort": "lab", "subject": "f0",
                                         "first_window": 0.0, "last_window": 60.0, "consecutive": 1,
                                         "retrain_fired": 0, "clear_streak": 0, "members": "[]",
                                         "escalations": 0, "alert_id": None})
        assert drift_episode_open(alerts, "m", "1.0.0")
        assert not drift_episode_open(alerts, "m", "2.0.0")
    finally:
        alerts.close()
