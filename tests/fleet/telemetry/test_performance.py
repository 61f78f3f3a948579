"""Model performance at the fleet: calibration fit, realised and estimated accuracy, and the
whole path (bundle built with holdout labels -> published -> device sketches with labels ->
ingest -> API, CLI, /metrics), with the bad paths."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from agent.contract.bundle import read_manifest
from agent.contract.manifest import CONFIDENCE_BINS, ReferenceProfile
from agent.contract.performance import PerformanceSketch, empty_sketch
from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from agent.telemetry.feedback import FeedbackConfig, PredictionLog
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.components import ensure_trust
from fleet.errors import FleetInputError
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.registry.calibration import fit_calibration, isotonic, performance_spec
from fleet.registry.publish import publish_bundle
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.drift_metrics import performance_families
from fleet.telemetry.ingest import TelemetryStore
from fleet.telemetry.monitor import BundleProfiles, build_drift_monitor
from fleet.telemetry.performance import estimate, summarize
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from simulators.models import make_mlp_onnx
from tests.support.fakes import FakeClock
from tests.support.telemetry import MLP_FEATURES, MLP_REFERENCE, T0, mlp_outputs


# -- pure parts ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_isotonic_pools_violators() -> None:
    assert isotonic(np.array([1.0, 3.0, 2.0, 4.0]), np.ones(4)).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert isotonic(np.array([0.5, 0.1]), np.array([1.0, 3.0])).tolist() == [0.2, 0.2]


@pytest.mark.unit
def test_calibration_maps_overconfidence_to_the_observed_accuracy() -> None:
    rng = np.random.default_rng(0)
    true_p = rng.uniform(0.4, 1.0, 40_000)
    raw = np.minimum(1.0, true_p * 1.3)  # over-confident
    correct = rng.random(true_p.size) < true_p
    cal = fit_calibration(raw, correct)
    assert all(b >= a for a, b in zip(cal.knots_y, cal.knots_y[1:], strict=False))
    mapped = np.interp(raw, cal.knots_x, cal.knots_y)
    assert abs(mapped.mean() - correct.mean()) < 0.005
    assert abs(raw.mean() - correct.mean()) > 0.1  # the map mattered
    assert len(cal.bin_se) == CONFIDENCE_BINS and max(cal.bin_se) <= 0.5
    assert cal.holdout_rows == 40_000
    with pytest.raises(FleetInputError, match="at least"):
        fit_calibration(raw[:10], correct[:10])


@pytest.mark.unit
def test_performance_spec_detects_task_and_scores_and_refuses_bad_labels() -> None:
    logits = np.random.default_rng(1).normal(size=(200, 3))
    assert performance_spec(logits[:, :1], None).task == "regression"
    spec = performance_spec(logits, np.argmax(logits, axis=1))
    assert spec.task == "classification" and spec.classes == 3 and spec.scores == "logits"
    assert spec.calibration is not None and spec.calibration.holdout_accuracy == 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert performance_spec(probs, None).scores == "probabilities"
    for bad in (np.full(200, 3), np.full(200, 0.5), np.zeros(199)):
        with pytest.raises(FleetInputError, match="holdout labels"):
            performance_spec(logits, bad)


@pytest.mark.unit
def test_realised_figures_and_estimate_band() -> None:
    p = PerformanceSketch("classification", confusion=np.array([[8, 2], [1, 9]]))
    s = summarize(p, None)
    assert s is not None and s.accuracy == pytest.approx(17 / 20) and s.estimated_accuracy is None
    assert [(c.precision, c.recall) for c in s.classes] == [(8 / 9, 0.8), (9 / 11, 0.9)]
    spec = performance_spec(np.array([[0.9, 0.1], [0.2, 0.8]] * 50), np.array([0, 1] * 50))
    prof = ReferenceProfile(performance=spec)
    c = np.full(400, 0.8)
    q = PerformanceSketch("classification", confusion=np.zeros((2, 2), np.int64),
                          confidence_counts=np.bincount(np.minimum((c * 20).astype(int), 19), minlength=20),
                          confidence_sum=float(c.sum()), confidence_sq_sum=float(c @ c))
    mean, low, high = estimate(q, prof) or (0.0, 0.0, 0.0)
    assert mean == pytest.approx(0.8) and low < 0.8 - 1.96 * 0.02 + 1e-9 and high > 0.8 + 0.039
    r = PerformanceSketch("regression", error_counts=np.zeros(82, np.int64), error_abs_sum=6.0,
                          error_sum=-2.0, error_sq_sum=20.0)
    r.error_counts[10] = 4
    s = summarize(r, None)
    assert s is not None and (s.mae, s.bias, s.rmse) == (1.5, -0.5, pytest.approx(np.sqrt(5.0)))
    assert summarize(None, None) is None


# -- the whole path -----------------------------------------------------------------------------
def _labels(x: np.ndarray, rng: np.random.Generator, flip: float) -> np.ndarray:
    """The model's own class, replaced by a random one for a share `flip` of rows."""
    y = np.argmax(mlp_outputs(x), axis=1)
    noisy = rng.random(len(y)) < flip
    return np.where(noisy, rng.integers(0, 4, len(y)), y)


@dataclass
class World:
    client: TestClient
    keys: dict[str, str]
    profile: ReferenceProfile
    telemetry_db: Path
    manifest_path: Path
    exact: dict[str, float]
    monitor_perf: Any

    def get(self, url: str, status: int = 200, **params: Any) -> Any:
        res = self.client.get(url, params=params, headers={"Authorization": f"Bearer {self.keys['viewer']}"})
        assert res.status_code == status, res.text
        return res.json()


def _device_report(profile: ReferenceProfile, device: str, cohort: str, x: np.ndarray, y: np.ndarray,
                   start: float) -> tuple[bytes, float]:
    """A device serving `x`, then sent every label: the encoded report and exact accuracy."""
    ticks = iter([start, start + 30.0])
    sk = TelemetrySketch(profile, device, "mlp", "1.0.0", cohort=cohort, clock=ticks.__next__,
                         resource_probe=lambda: (0, 0.0, 0.0))
    log = PredictionLog(FeedbackConfig(capacity=len(x), max_batch=len(x)))
    out = mlp_outputs(x)
    sk.update(x, out, 0.001)
    ids = log.record("mlp-1.0.0", sk.performance.predicted(out))
    pairs = log.match(list(zip(ids, y.tolist(), strict=True))).pairs["mlp-1.0.0"]
    sk.fold_labels(np.asarray(pairs.predicted), np.asarray(pairs.labels))
    return encode_report(sk.snapshot_and_reset()), float(np.mean(np.argmax(out, axis=1) == y))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("performance")
    rng = np.random.default_rng(7)
    settings = FleetSettings(data_dir=tmp / "fleet")
    store = Store(settings.db_path, clock=FakeClock())
    keys = {role: create_api_key(store, role, role, "test")[1] for role in ("viewer",)}
    (tmp / "m.onnx").write_bytes(make_mlp_onnx(0))
    hold = rng.standard_normal((4000, 32)).astype(np.float32)
    meta = BundleMetadata(name="mlp", version="1.0.0", feature_names=MLP_FEATURES, bins=20)
    bundle = build_bundle(tmp / "m.onnx", meta, tmp / "m.efb", reference_data=MLP_REFERENCE,
                          holdout_data=hold, holdout_labels=_labels(hold, rng, 0.3))
    _, repo = ensure_trust(settings)
    publish_bundle(store, repo, bundle, "mlp", "test")
    manifest = read_manifest(bundle)
    profile = manifest.reference_profile
    manifest_path = tmp / "manifest.json"
    manifest_path.write_bytes(manifest.to_json())
    telemetry = TelemetryStore(settings.telemetry_db_path, profiles=BundleProfiles(
        store, Repository(settings.repo_dir, KeyStore(settings.keys_dir))), clock=lambda: T0 + 100_000)
    exact: dict[str, float] = {}
    for cohort, flip in (("a", 0.3), ("b", 0.6)):
        hits = rows = 0.0
        for d in range(2):
            x = rng.standard_normal((1500, 32)).astype(np.float32)
            y = _labels(x, rng, flip)
            payload, acc = _device_report(profile, f"dev-{cohort}{d}", cohort, x, y, T0 + 61)
            assert telemetry.ingest(payload) == "accepted"
            hits, rows = hits + acc * 1500, rows + 1500
        exact[cohort] = hits / rows
    monitor = build_drift_monitor(settings, store, telemetry, clock=FakeClock(T0 + 60 * 3 + 30))
    monitor.run_once()
    monitor_perf = performance_families(monitor)
    monitor.stop()
    telemetry.close()
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield World(client, keys, profile, settings.telemetry_db_path, manifest_path, exact, monitor_perf)
    store.close()


@pytest.mark.integration
def test_the_bundle_ships_a_signed_calibration_map(world: World) -> None:
    spec = world.profile.performance
    assert spec is not None and spec.task == "classification"
    assert spec.classes == 4 and spec.scores == "logits"
    assert spec.calibration is not None and 0.7 < spec.calibration.holdout_accuracy < 0.85


@pytest.mark.integration
def test_api_shows_realised_beside_estimated_per_cohort(world: World) -> None:
    items = world.get("/v1/telemetry/performance", model="mlp", version="1.0.0", by_cohort="true")["items"]
    by = {i["cohort"]: i for i in items}
    assert set(by) == {"a", "b"}
    for cohort, item in by.items():
        assert item["task"] == "classification" and item["labelled"] == 3000
        assert item["accuracy"] == pytest.approx(world.exact[cohort], abs=1e-12)  # folded labels are exact
        assert sum(c["support"] for c in item["classes"]) == 3000
        assert item["feedback"]["matched"] == 3000 and item["feedback"]["unknown"] == 0
        assert item["estimate_low"] <= item["estimated_accuracy"] <= item["estimate_high"]
    # cohort a is labelled like the holdout: the estimate holds there; cohort b's labels are
    # noisier than the holdout's (p(y|x) changed: concept drift), which confidence cannot see
    assert abs(by["a"]["estimated_accuracy"] - world.exact["a"]) < 0.03
    assert by["b"]["estimated_accuracy"] - world.exact["b"] > 0.15
    merged = world.get("/v1/telemetry/performance", model="mlp", version="1.0.0")["items"]
    assert len(merged) == 1 and merged[0]["cohort"] is None and merged[0]["labelled"] == 6000
    windows = world.get("/v1/telemetry/performance", model="mlp", version="1.0.0", per_window="true",
                        cohort="a")["items"]
    assert [w["window_start"] for w in windows] == [T0 + 60]
    world.get("/v1/telemetry/performance", 404, model="mlp", version="9.9.9")
    world.get("/v1/telemetry/performance", 422, model="mlp")


@pytest.mark.integration
def test_metrics_export_accuracy_of_the_latest_window(world: World) -> None:
    acc = {tuple(s.labels.values()): s.value for s in world.monitor_perf[0].samples}
    assert acc[("mlp", "1.0.0", "a", "realised")] == pytest.approx(world.exact["a"])
    assert ("mlp", "1.0.0", "b", "estimated") in acc and ("mlp", "1.0.0", "b", "estimated_low") in acc
    outcomes = {s.labels["outcome"]: s.value for s in world.monitor_perf[2].samples
                if s.labels["cohort"] == "a"}
    assert outcomes["matched"] == 3000


@pytest.mark.integration
def test_cli_prints_realised_and_estimated(world: World) -> None:
    res = subprocess.run([sys.executable, "-m", "fleet.cli.telemetry", "performance", "--db",
                          str(world.telemetry_db), "--model", "mlp", "--version", "1.0.0", "--cohort", "a",
                          "--profile", str(world.manifest_path), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    item = json.loads(res.stdout)["items"][0]
    assert item["accuracy"] == pytest.approx(world.exact["a"]) and item["estimated_accuracy"] is not None
    missing = subprocess.run([sys.executable, "-m", "fleet.cli.telemetry", "performance", "--db",
                              str(world.telemetry_db), "--model", "mlp", "--version", "2.0.0"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "no telemetry" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.integration
def test_ingest_refuses_performance_that_does_not_fit_the_version(world: World, tmp_path: Path) -> None:
    telemetry = TelemetryStore(tmp_path / "t.db", profiles=lambda m, v: world.profile)
    x = np.random.default_rng(2).standard_normal((20, 32)).astype(np.float32)
    good, _ = _device_report(world.profile, "dev-x", "a", x, np.zeros(20, int), T0 + 61)
    assert telemetry.ingest(good) == "accepted"
    sk = TelemetrySketch(world.profile, "dev-y", "mlp", "1.0.0", resource_probe=lambda: (0, 0.0, 0.0))
    sk.update(x, mlp_outputs(x), 0.001)
    rep = sk.snapshot_and_reset()
    assert rep.performance is not None
    three = empty_sketch(ReferenceProfile(outputs=world.profile.outputs[:3]))
    three.confusion[0, 0] = 5
    rep.performance = three  # a 3x3 confusion matrix for a 4-class model
    assert telemetry.ingest(encode_report(rep)) == "rejected"
    rep.seq += 1
    rep.performance = PerformanceSketch("regression", error_counts=np.zeros(82, np.int64))
    assert telemetry.ingest(encode_report(rep)) == "rejected"
    assert telemetry.counters.reasons == {"performance_mismatch": 2}
    rep.seq += 1
    rep.performance = None  # an agent from before labels existed
    assert telemetry.ingest(encode_report(rep)) == "accepted"
    telemetry.close()
