"""The version page charts accuracy per cohort and window: realised (labels) beside estimated."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from agent.contract.bundle import read_manifest
from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from agent.telemetry.feedback import FeedbackConfig, PredictionLog
from fleet.access.auth import create_api_key
from fleet.components import ensure_trust
from fleet.dashboard.charts import line_chart
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.registry.publish import publish_bundle
from fleet.service import FleetService
from fleet.settings import FleetSettings
from fleet.telemetry.ingest import TelemetryStore
from simulators.models import make_mlp_onnx
from tests.support.telemetry import MLP_FEATURES, MLP_REFERENCE, T0, mlp_outputs


def _report(profile: ReferenceProfile, device: str, cohort: str, start: float, flip: float,
            rng: np.random.Generator, labelled: bool) -> bytes:
    ticks = iter([start, start + 30.0])
    sk = TelemetrySketch(profile, device, "mlp", "1.0.0", cohort=cohort, clock=ticks.__next__,
                         resource_probe=lambda: (0, 0.0, 0.0))
    x = rng.standard_normal((600, 32)).astype(np.float32)
    out = mlp_outputs(x)
    sk.update(x, out, 0.001)
    if labelled:
        y = np.argmax(out, axis=1)
        y = np.where(rng.random(len(y)) < flip, rng.integers(0, 4, len(y)), y)
        log = PredictionLog(FeedbackConfig(capacity=len(x), max_batch=len(x)))
        ids = log.record("mlp-1.0.0", sk.performance.predicted(out))
        pairs = log.match(list(zip(ids, y.tolist(), strict=True))).pairs["mlp-1.0.0"]
        sk.fold_labels(np.asarray(pairs.predicted), np.asarray(pairs.labels))
    return encode_report(sk.snapshot_and_reset())


@pytest.mark.integration
def test_the_version_page_draws_realised_and_estimated_accuracy_per_cohort(tmp_path: Path) -> None:
    settings = FleetSettings(data_dir=tmp_path / "fleet")
    svc = FleetService(settings)
    rng = np.random.default_rng(3)
    (tmp_path / "m.onnx").write_bytes(make_mlp_onnx(0))
    hold = rng.standard_normal((2000, 32)).astype(np.float32)
    meta = BundleMetadata(name="mlp", version="1.0.0", feature_names=MLP_FEATURES, bins=20)
    bundle = build_bundle(tmp_path / "m.onnx", meta, tmp_path / "m.efb", reference_data=MLP_REFERENCE,
                          holdout_data=hold, holdout_labels=np.argmax(mlp_outputs(hold), axis=1))
    _, repo = ensure_trust(settings)
    publish_bundle(svc.store, repo, bundle, "mlp", "test")
    profile = read_manifest(bundle).reference_profile
    assert profile is not None
    telemetry = TelemetryStore(settings.telemetry_database, clock=lambda: T0 + 10_000)
    for k in range(3):  # cohort a: labels, accuracy falls window by window; cohort b: no labels
        start = T0 + 60 * (k + 1) + 1
        assert telemetry.ingest(_report(profile, f"dev-a{k}", "a", start, 0.2 * k, rng, True)) == "accepted"
        assert telemetry.ingest(_report(profile, f"dev-b{k}", "b", start, 0.0, rng, False)) == "accepted"
    telemetry.close()
    viewer = create_api_key(svc.store, "v", "viewer", "test")[1]
    with TestClient(svc.app) as client:
        page = client.get("/ui/login")
        token = re.search(r'name="login_token" value="([^"]+)"', page.text)
        assert token is not None
        client.post("/ui/login", data={"key": viewer, "login_token": token.group(1), "next": "/ui/"})
        html = client.get("/ui/models/mlp/versions/1.0.0").text
    svc.store.close()
    svg = re.search(r'<svg class="linechart" data-chart="accuracy".*?</svg>', html, re.S)
    assert svg is not None, html[-2000:]
    series = re.findall(r'data-series="([^"]+)" points="([^"]+)"', svg.group(0))
    names = {name: pts.split() for name, pts in series}
    assert set(names) == {"realised (a)", "estimated (a)", "estimated (b)"}  # b has no labels
    ys = [float(p.split(",")[1]) for p in names["realised (a)"]]
    assert len(ys) == 3 and ys[0] < ys[1] < ys[2]  # falling accuracy is drawn lower (larger y)
    assert re.search(r'data-table="accuracy".*?<td>a</td>.*?<td class="num">600</td>', html, re.S)


@pytest.mark.unit
def test_line_chart_geometry() -> None:
    c = line_chart([("realised (a)", False, [(0.0, 1.0), (10.0, 0.0)]), ("estimated (a)", True, [(5.0, 0.5)]),
                    ("realised (b)", False, [(10.0, 2.0)])], str)
    first, est, other = c.lines
    assert first.points == f"{c.left:.1f},{c.top:.1f} {c.width - 150:.1f},{c.bottom:.1f}"
    assert est.colour == first.colour and other.colour != first.colour and est.dashed
    assert other.marks[0][1] == c.top  # clamped to 1.0
    assert line_chart([], str).lines == []
