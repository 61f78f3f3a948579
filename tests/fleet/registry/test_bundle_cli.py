"""`edgefleet bundle build/inspect/schema` as a subprocess, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.contract.manifest import ReferenceProfile, json_schema
from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.telemetry.ingest import TelemetryStore
from simulators.models import make_mlp_onnx, mlp_reference, mlp_weights


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "bundle", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_build_then_inspect(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(make_mlp_onnx(0))
    np.save(tmp_path / "ref.npy", np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32))
    (tmp_path / "meta.json").write_text(
        json.dumps({"name": "mlp", "version": "2.0.0", "lineage": {"dataset_ref": "s3://data/v3"}})
    )
    built = _cli(
        "build",
        tmp_path / "m.onnx",
        "--metadata",
        tmp_path / "meta.json",
        "--reference-data",
        tmp_path / "ref.npy",
        "--quantize",
        "dynamic",
        "-o",
        tmp_path / "b.efb",
    )
    assert built.returncode == 0, built.stderr
    assert "wrote" in built.stdout
    text = _cli("inspect", tmp_path / "b.efb")
    assert text.returncode == 0, text.stderr
    assert "mlp-2.0.0  (verified)" in text.stdout and "int8-dynamic" in text.stdout
    assert "dataset_ref=s3://data/v3" in text.stdout
    as_json = _cli("inspect", tmp_path / "b.efb", "--json")
    summary = json.loads(as_json.stdout)
    assert summary["runtime"] == "onnx" and summary["quantization"]["scheme"] == "int8-dynamic"
    assert summary["golden_vectors"] == 16 and summary["profiled_features"] == 32

    data = bytearray((tmp_path / "b.efb").read_bytes())
    data[data.index(b"model.onnx\x00") + 512 + 100] ^= 0x01  # inside the model member
    (tmp_path / "bad.efb").write_bytes(bytes(data))
    bad = _cli("inspect", tmp_path / "bad.efb")
    assert bad.returncode == 1
    assert "invalid bundle" in bad.stderr and "disagrees" in bad.stderr


@pytest.mark.integration
def test_build_with_bad_metadata_exits_1(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(make_mlp_onnx(0))
    (tmp_path / "meta.json").write_text(json.dumps({"name": "Bad Name!", "version": "1.0.0"}))
    out = _cli("build", tmp_path / "m.onnx", "--metadata", tmp_path / "meta.json", "-o", tmp_path / "b.efb",
               "--no-profile")
    assert out.returncode == 1
    assert "name must match" in out.stderr
    assert not (tmp_path / "b.efb").exists()


@pytest.mark.integration
def test_build_without_reference_data_needs_no_profile_and_warns(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(make_mlp_onnx(0))
    (tmp_path / "meta.json").write_text(json.dumps({"name": "mlp", "version": "1.0.0"}))
    args = ("build", tmp_path / "m.onnx", "--metadata", tmp_path / "meta.json", "-o", tmp_path / "b.efb")
    refused = _cli(*args)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "no reference data" in refused.stderr and "--no-profile" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.efb").exists()
    built = _cli(*args, "--no-profile")
    assert built.returncode == 0, built.stderr
    assert "drift monitoring is OFF" in built.stderr
    quantized = _cli(*args, "--no-profile", "--quantize", "dynamic")
    assert quantized.returncode == 1 and "quantization needs reference data" in quantized.stderr


@pytest.mark.integration
def test_schema_prints_the_manifest_schema() -> None:
    out = _cli("schema")
    assert out.returncode == 0
    assert json.loads(out.stdout) == json.loads(json.dumps(json_schema()))


@pytest.mark.integration
def test_inspect_json_feeds_telemetry_drift_through_a_pipe(tmp_path: Path) -> None:
    """`bundle inspect --json | telemetry drift --profile -`: drift against the profile the devices got."""
    rng = np.random.default_rng(0)
    (tmp_path / "m.onnx").write_bytes(make_mlp_onnx(0))
    np.save(tmp_path / "ref.npy", rng.standard_normal((600, 32)).astype(np.float32))
    (tmp_path / "meta.json").write_text(json.dumps({"name": "mlp", "version": "2.0.0"}))
    built = _cli("build", tmp_path / "m.onnx", "--metadata", tmp_path / "meta.json",
                 "--reference-data", tmp_path / "ref.npy", "-o", tmp_path / "b.efb")
    assert built.returncode == 0, built.stderr
    doc = json.loads(_cli("inspect", tmp_path / "b.efb", "--json").stdout)
    assert doc["manifest"]["name"] == "mlp" and doc["manifest"]["model_digest"] == doc["model_digest"]
    prof = ReferenceProfile.model_validate(doc["reference_profile"])
    assert len(prof.features) == 32 and prof.outputs
    store = TelemetryStore(tmp_path / "t.db")
    sk = TelemetrySketch(prof, "dev-1", "mlp", "2.0.0", resource_probe=lambda: (0, 0.0, 0.0))
    shifted = rng.normal(1.5, 1.0, size=(2000, 32)).astype(np.float32)
    sk.update(shifted, mlp_reference(shifted, mlp_weights(0)), 0.002)
    assert store.ingest(encode_report(sk.snapshot_and_reset())) == "accepted"
    store.close()
    py = sys.executable
    drift = (f"{py} -m fleet.cli.telemetry drift --db {tmp_path / 't.db'} --profile - "
             "--model mlp --version 2.0.0")
    piped = subprocess.run(f"{py} -m agent.cli bundle inspect {tmp_path / 'b.efb'} --json | {drift} --json",
                           shell=True, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    verdict = json.loads(piped.stdout)
    assert verdict["dataset_drift"] and sum(c["role"] == "feature" for c in verdict["columns"]) == 32
    # A bundle without a profile has nothing to compare with: refused in one line, no traceback.
    _cli("build", tmp_path / "m.onnx", "--metadata", tmp_path / "meta.json", "--no-profile",
         "-o", tmp_path / "n.efb")
    empty = subprocess.run(f"{py} -m agent.cli bundle inspect {tmp_path / 'n.efb'} --json | {drift}",
                           shell=True, capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and "profile is empty" in empty.stderr and "Traceback" not in empty.stderr
    junk = subprocess.run(f"echo '[1, 2]' | {drift}", shell=True, capture_output=True, text=True, timeout=120)
    assert junk.returncode == 1 and "standard input: not a reference profile" in junk.stderr

def test_build_with_holdout_ships_a_calibration_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    (tmp_path / "m.onnx").write_bytes(make_mlp_onnx(0))
    np.save(tmp_path / "ref.npy", rng.standard_normal((300, 32)).astype(np.float32))
    np.save(tmp_path / "hold.npy", rng.standard_normal((400, 32)).astype(np.float32))
    np.save(tmp_path / "labels.npy", rng.integers(0, 4, 400))
    (tmp_path / "meta.json").write_text(json.dumps({"name": "mlp", "version": "1.0.0"}))
    common = ["build", tmp_path / "m.onnx", "--metadata", tmp_path / "meta.json", "--reference-data",
              tmp_path / "ref.npy", "-o", tmp_path / "b.efb"]
    lonely = _cli(*common, "--holdout-data", tmp_path / "hold.npy")
    assert lonely.returncode == 2 and "go together" in lonely.stderr
    np.save(tmp_path / "bad.npy", np.full(400, 9))
    bad = _cli(*common, "--holdout-data", tmp_path / "hold.npy", "--holdout-labels", tmp_path / "bad.npy")
    assert bad.returncode == 1 and "class indices 0..3" in bad.stderr and "Traceback" not in bad.stderr
    labels = tmp_path / "labels.npy"
    built = _cli(*common, "--holdout-data", tmp_path / "hold.npy", "--holdout-labels", labels)
    assert built.returncode == 0, built.stderr
    shown = _cli("inspect", tmp_path / "b.efb", "--json")
    assert shown.returncode == 0, shown.stderr
    perf = json.loads(shown.stdout)["performance"]
    assert perf["task"] == "classification" and perf["classes"] == 4 and perf["scores"] == "logits"
    assert perf["calibration"]["holdout_rows"] == 400 and len(perf["calibration"]["bin_se"]) == 20
