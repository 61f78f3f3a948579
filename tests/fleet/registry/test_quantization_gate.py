"""The int8 gate protects the user by output kind, and says when quantization does not pay.

Pure decisions (`quant_gate.judge`, `resolve_kind`) on crafted outputs, then real builds: a tiny
model whose QDQ int8 file is larger than the float one (refused, or kept with a recorded
warning), a softmax model judged as probabilities, and the `bundle build` CLI's messages.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.contract.bundle import read_manifest
from fleet.errors import GateFailed
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.registry.quant_gate import QuantizationGate, judge, resolve_kind
from simulators.models import make_mlp_onnx

GATE = QuantizationGate()
SIZES = {"float_bytes": 10_000, "int8_bytes": 4_000}


def _probs(n: int = 200, seed: int = 0) -> np.ndarray:
    p = np.random.default_rng(seed).dirichlet([1.0, 1.0, 1.0], size=n)
    p[:, 0] += 2.0  # a clear top-1 for every row, so agreement is not what trips
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.unit
def test_one_probability_moving_by_0_745_is_refused() -> None:
    f = np.tile([0.9, 0.1], (100, 1))
    q = f.copy()
    q[7] = [0.155, 0.845]  # the change a flat max_abs_delta of 1.0 let pass
    verdict = judge(GATE, "probabilities", f, q, **SIZES)
    assert any(p.startswith("max probability delta 0.745 > 0.25") for p in verdict.problems), verdict.problems
    assert verdict.figures["label_agreement"] == 0.99


@pytest.mark.unit
def test_a_systematic_small_distortion_is_refused_by_the_p99_bound() -> None:
    f = _probs()
    q = f + np.array([-0.07, 0.035, 0.035])  # every row, under the max bound
    verdict = judge(GATE, "probabilities", f, q, **SIZES)
    assert verdict.figures["max_prob_delta"] < GATE.max_prob_delta
    assert [p.split(" ")[0] for p in verdict.problems] == ["p99", "mean"]
    near = judge(GATE, "probabilities", f, f + np.array([-0.004, 0.002, 0.002]), **SIZES)
    assert near.problems == [] and near.limits["p99_prob_delta"] == 0.05


@pytest.mark.unit
def test_logits_are_judged_on_their_softmax() -> None:
    logits = np.random.default_rng(1).normal(0, 3, size=(300, 4))
    shifted = judge(GATE, "logits", logits, logits + 3.0, **SIZES)  # same probabilities, same labels
    assert shifted.problems == [] and shifted.figures["max_abs_delta"] == pytest.approx(3.0)
    noisy = logits + np.random.default_rng(2).normal(0, 1.0, size=logits.shape)
    refused = judge(GATE, "logits", logits, noisy, **SIZES)
    assert any("softmax probability delta" in p for p in refused.problems)
    assert any(p.startswith("top-1 agreement") for p in refused.problems)


@pytest.mark.unit
def test_regression_deltas_count_in_output_std() -> None:
    rng = np.random.default_rng(3)
    wide = rng.normal(0, 100.0, size=(500, 1))
    err = rng.normal(0, 2.0, size=(500, 1))
    assert judge(GATE, "regression", wide, wide + err, **SIZES).problems == []  # 2 units of a 100 std
    narrow = wide / 100.0
    refused = judge(GATE, "regression", narrow, narrow + err, **SIZES)  # 2 units of a 1 std
    assert [p.split(" ")[0] for p in refused.problems] == ["p99", "max", "mean"]
    assert refused.figures["output_std"] == pytest.approx(1.0, rel=0.1)
    explicit = judge(QuantizationGate(max_abs_delta=0.5), "regression", wide, wide + err, **SIZES)
    assert explicit.problems[0].startswith("max abs delta") and explicit.limits["max_abs_delta"] == 0.5


@pytest.mark.unit
def test_output_kind_is_detected_from_the_op_then_the_values() -> None:
    logits = np.random.default_rng(0).normal(size=(50, 3))
    assert resolve_kind("auto", "Softmax", logits) == "probabilities"
    assert resolve_kind("auto", "Add", _probs(50)) == "probabilities"
    assert resolve_kind("auto", "Add", logits) == "logits"
    assert resolve_kind("auto", "Sigmoid", logits[:, :1]) == "probabilities"
    assert resolve_kind("auto", "Add", logits[:, :1]) == "regression"
    assert resolve_kind("regression", "Softmax", logits) == "regression"


@pytest.mark.unit
def test_an_int8_model_that_is_not_smaller_is_refused_or_warned() -> None:
    f = _probs()
    larger = judge(GATE, "probabilities", f, f, float_bytes=226, int8_bytes=1511)
    assert len(larger.problems) == 1
    assert "larger than the float one (1511 vs 226 bytes, 6.69x)" in larger.problems[0]
    kept = judge(QuantizationGate(allow_larger=True), "probabilities", f, f, float_bytes=226, int8_bytes=1511)
    assert kept.problems == [] and "does not pay" in kept.warnings[0]
    same = judge(GATE, "probabilities", f, f, float_bytes=500, int8_bytes=500)
    assert same.problems == [] and "as large as" in same.warnings[0]
    assert judge(GATE, "probabilities", f, f, **SIZES).warnings == []


REF = np.random.default_rng(7).standard_normal((400, 4)).astype(np.float32)


@pytest.mark.integration
def test_a_tiny_models_qdq_int8_is_refused_then_kept_with_a_recorded_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "tiny.onnx").write_bytes(make_mlp_onnx(0, sizes=(4, 3)))
    meta = BundleMetadata(name="tiny", version="1.0.0", quantize="static")
    with pytest.raises(GateFailed, match="larger than the float one") as err:
        build_bundle(tmp_path / "tiny.onnx", meta, tmp_path / "t.efb", reference_data=REF)
    assert err.value.figures["size_ratio"] > 1.0 and not (tmp_path / "t.efb").exists()
    keep = meta.model_copy(update={"quantization_gate": QuantizationGate(allow_larger=True)})
    with caplog.at_level(logging.WARNING, logger="edgefleet.fleet.quantize"):
        out = build_bundle(tmp_path / "tiny.onnx", keep, tmp_path / "t.efb", reference_data=REF)
    calibration = read_manifest(out).quantization.calibration
    assert calibration["size_ratio"] > 1.0 and "does not pay" in calibration["warnings"][0]
    assert any("bundle.quantization_warning" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_a_softmax_model_is_gated_as_probabilities(tmp_path: Path) -> None:
    (tmp_path / "clf.onnx").write_bytes(make_mlp_onnx(0, sizes=(32, 64, 64, 4), softmax=True))
    ref = np.random.default_rng(7).standard_normal((600, 32)).astype(np.float32)
    out = build_bundle(tmp_path / "clf.onnx", BundleMetadata(name="clf", version="1.0.0", quantize="static"),
                       tmp_path / "c.efb", reference_data=ref)
    calibration = read_manifest(out).quantization.calibration
    assert calibration["output_kind"] == "probabilities"
    assert calibration["limits"] == {"min_label_agreement": 0.97, "p99_prob_delta": 0.05,
                                     "max_prob_delta": 0.25, "max_mean_prob_delta": 0.01}
    assert calibration["p99_prob_delta"] <= 0.05 and calibration["warnings"] == []


def _build(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "bundle", "build", str(tmp_path / "tiny.onnx"),
                           "--metadata", str(tmp_path / "meta.json"),
                           "--reference-data", str(tmp_path / "ref.npy"),
                           "--quantize", "dynamic", "-o", str(tmp_path / "t.efb"), *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_bundle_build_cli_refuses_a_larger_int8_and_warns_when_kept(tmp_path: Path) -> None:
    (tmp_path / "tiny.onnx").write_bytes(make_mlp_onnx(0, sizes=(4, 3)))
    (tmp_path / "meta.json").write_text(json.dumps({"name": "tiny", "version": "1.0.0"}))
    np.save(tmp_path / "ref.npy", REF)
    refused = _build(tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "larger than the float one" in refused.stderr and "--allow-larger-int8" in refused.stderr
    kept = _build(tmp_path, "--allow-larger-int8", "--output-kind", "logits")
    assert kept.returncode == 0, kept.stderr
    assert "WARNING: the int8 model is larger than the float one" in kept.stderr
    assert "int8 gate (logits output)" in kept.stdout and "size_ratio=" in kept.stdout
