"""Rollout gates fed by real telemetry: device-built sketches ingested by the telemetry store,
read through `TelemetryMetrics`, drift scored by the drift monitor against the bundles'
reference profiles. The controller runs over real SQLite, TUF repository and signer with an
injected clock; the devices' reported state and telemetry are played by the test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.contract.bundle import read_manifest
from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.components import ensure_trust
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.registry.publish import publish_bundle
from fleet.rollouts.controller import RolloutController
from fleet.rollouts.gates import TelemetryMetrics
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.ingest import TelemetryStore
from fleet.telemetry.monitor import build_drift_monitor
from fleet.trust.director_signer import DirectorSigner
from simulators.models import make_mlp_onnx
from tests.support.fakes import FakeClock
from tests.support.telemetry import (
    MLP_FEATURES,
    MLP_REFERENCE,
    T0,
    column_shift,
    encoded_reports,
    mlp_outputs,
)

pytestmark = pytest.mark.integration


class Recorder:
    def __init__(self) -> None:
        self.sent: dict[str, str] = {}

    def publish_desired(self, device_id: str | None = None, cohort: str | None = None, *,
                        document: bytes) -> str:
        assert device_id is not None
        self.sent[device_id] = json.loads(document)["signed"]["target"]["version"]
        return device_id


@dataclass
class Gates:
    clock: FakeClock
    store: Store
    telemetry: TelemetryStore
    ctl: RolloutController
    profile: ReferenceProfile
    pub: Recorder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MLP bundle (20-bin reference profile) as versions 1.0.0 and 2.0.0, built once."""
    tmp = tmp_path_factory.mktemp("gate-bundles")
    model = tmp / "mlp.onnx"
    model.write_bytes(make_mlp_onnx(0))
    return {v: build_bundle(model, BundleMetadata(name="mlp", version=v, feature_names=MLP_FEATURES, bins=20),
                            tmp / f"mlp-{v}.efb", reference_data=MLP_REFERENCE) for v in ("1.0.0", "2.0.0")}


@pytest.fixture
def gates(tmp_path: Path, bundles: dict[str, Path]) -> Iterator[Gates]:
    clock = FakeClock(T0)
    settings = FleetSettings(data_dir=tmp_path / "fleet")
    store = Store(settings.db_path, clock=clock)
    _, repo = ensure_trust(settings)
    for bundle in bundles.values():
        publish_bundle(store, repo, bundle, "mlp", "test")
    profile = read_manifest(bundles["1.0.0"]).reference_profile
    telemetry = TelemetryStore(tmp_path / "telemetry.db", clock=clock)
    monitor = build_drift_monitor(settings, store, telemetry, clock)
    keystore = repo.keystore
    pub = Recorder()
    ctl = RolloutController(store, repo, DirectorSigner(keystore, tmp_path / "director"), pub, clock,
                            metrics=TelemetryMetrics(telemetry, drift=monitor.drift_score))
    for dev in ("a", "b"):
        store.devices.create(dev, {"env": "prod"}, {}, dev, "$7$x", "t")
        store.devices.record_reported_state(dev, {"state": "idle", "active_bundle": "mlp-1.0.0",
                                                  "timestamp": clock.now})
    yield Gates(clock, store, telemetry, ctl, profile, pub)
    monitor.alerts.close()
    telemetry.close()
    store.close()


def _reports(profile: ReferenceProfile, version: str, latency_s: float, requests: int,
             errors: int = 0) -> list[bytes]:
    """One device's report for window T0+60 with `requests` single-row calls of `latency_s`."""
    ticks = iter([T0 + 61.0, T0 + 119.0])
    sketch = TelemetrySketch(profile, f"dev-{version}", "mlp", version, cohort="prod", clock=ticks.__next__,
                             resource_probe=lambda: (0, 0.0, 0.0))
    x = np.random.default_rng(1).normal(size=(requests, 32)).astype(np.float32)
    for i in range(requests):
        sketch.update(x[i:i + 1], mlp_outputs(x[i:i + 1]), latency_s, error=i < errors)
    return [encode_report(sketch.snapshot_and_reset())]


def _run_canary(g: Gates, thresholds: dict[str, float]) -> str:
    rid = str(g.store.rollouts.create("mlp:2.0.0", "env=prod", {"kind": "canary", "stages": [50, 100],
                                                                  "bake_s": 0}, thresholds, "op").id)
    g.ctl.tick()
    canary = next(iter(g.pub.sent))
    g.store.devices.record_reported_state(canary, {"state": "idle", "active_bundle": "mlp-2.0.0",
                                                   "timestamp": g.clock.now})
    return rid


def test_a_latency_regression_in_telemetry_pauses_the_rollout(gates: Gates) -> None:
    for payload in (_reports(gates.profile, "1.0.0", 0.002, 400)
                    + _reports(gates.profile, "2.0.0", 0.02, 400)):
        assert gates.telemetry.ingest(payload) == "accepted"
    rid = _run_canary(gates, {"min_requests": 200})
    gates.clock.advance(180)
    gates.ctl.tick()
    ro = gates.store.rollouts.get(rid)
    assert ro.state == "paused", ro.history
    assert "latency p95" in ro.history[-1]["note"]
    assert len(gates.pub.sent) == 1  # the second device was never told to update


def test_error_rate_increase_pauses_and_equal_telemetry_passes(gates: Gates) -> None:
    for payload in (_reports(gates.profile, "1.0.0", 0.002, 400, errors=2)
                    + _reports(gates.profile, "2.0.0", 0.002, 400, errors=60)):
        gates.telemetry.ingest(payload)
    rid = _run_canary(gates, {"min_requests": 200})
    gates.clock.advance(180)
    gates.ctl.tick()
    assert "error rate" in gates.store.rollouts.get(rid).history[-1]["note"]


def test_drift_of_the_candidate_pauses_the_rollout(gates: Gates) -> None:
    rid = _run_canary(gates, {"max_drift_score": 0.5})
    shift = column_shift(32, range(24), 1.5)  # most input columns moved: dataset drift
    for payload in encoded_reports(gates.profile, "mlp", "2.0.0", "prod", 2, [shift],
                                   outputs=mlp_outputs, start=T0):
        assert gates.telemetry.ingest(payload) == "accepted"
    gates.clock.advance(180)
    gates.ctl.tick()
    ro = gates.store.rollouts.get(rid)
    assert ro.state == "paused" and "drift score" in ro.history[-1]["note"], ro.history


def test_healthy_telemetry_lets_the_rollout_complete(gates: Gates) -> None:
    for payload in (_reports(gates.profile, "1.0.0", 0.002, 400)
                    + _reports(gates.profile, "2.0.0", 0.002, 400)
                    + encoded_reports(gates.profile, "mlp", "2.0.0", "prod", 2, [0.0], outputs=mlp_outputs,
                                      start=T0)):
        gates.telemetry.ingest(payload)
    rid = _run_canary(gates, {"min_requests": 200})
    gates.clock.advance(180)
    gates.ctl.tick()
    gates.ctl.tick()
    for dev in ("a", "b"):
        gates.store.devices.record_reported_state(dev, {"state": "idle", "active_bundle": "mlp-2.0.0",
                                                        "timestamp": gates.clock.now})
    gates.ctl.tick()
    assert gates.store.rollouts.get(rid).state == "completed"
