"""`edgefleet agent predict` as a real subprocess on real bundles and files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.contract.bundle import write_bundle
from simulators.models import make_mlp_onnx, make_mlp_tflite, mlp_manifest, mlp_reference, mlp_weights

X = np.random.default_rng(5).standard_normal((300, 32)).astype(np.float32)
REF = mlp_reference(X, mlp_weights(0))


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "agent", "predict", "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _model_dir(tmp_path: Path, runtime: str = "onnx") -> Path:
    data = make_mlp_onnx(0) if runtime == "onnx" else make_mlp_tflite(0)
    d = tmp_path / f"extracted-{runtime}"
    d.mkdir()
    (d / f"model.{runtime}").write_bytes(data)
    (d / "manifest.json").write_bytes(mlp_manifest(data, runtime=runtime).to_json())
    return d


@pytest.mark.integration
@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_npy_from_model_dir(tmp_path: Path, runtime: str) -> None:
    np.save(tmp_path / "in.npy", X)
    res = _cli(
        "--model-dir",
        _model_dir(tmp_path, runtime),
        tmp_path / "in.npy",
        "-o",
        tmp_path / "out.npy",
        "--batch-size",
        "64",
    )
    assert res.returncode == 0, res.stderr
    assert "scored 300 rows with mlp-1.0.0" in res.stderr
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (300, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, REF, atol=1e-5)


@pytest.mark.integration
def test_csv_and_jsonl_from_bundle(tmp_path: Path) -> None:
    data = make_mlp_onnx(0)
    bundle = write_bundle(mlp_manifest(data), data, tmp_path / "mlp.efb")
    header = ",".join(f"f{i}" for i in range(32))
    np.savetxt(tmp_path / "in.csv", X, delimiter=",", header=header, comments="", fmt="%.9g")
    res = _cli("--bundle", bundle, tmp_path / "in.csv", "-o", tmp_path / "out.csv", "--batch-size", "100")
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "logits_0,logits_1,logits_2,logits_3"
    np.testing.assert_allclose(np.loadtxt(lines[1:], delimiter=","), REF, atol=1e-5)

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"x": row}) + "\n" for row in X[:7].tolist()))
    res = _cli("--bundle", bundle, tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--batch-size", "3")
    assert res.returncode == 0, res.stderr
    got = [json.loads(line)["logits"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(np.asarray(got), REF[:7], atol=1e-5)


@pytest.mark.integration
def test_bad_inputs_fail_with_row_numbers_and_write_nothing(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    rows = [",".join("0.5" for _ in range(32))] * 4 + [",".join("0.5" for _ in range(31))]
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    res = _cli("--model-dir", model_dir, tmp_path / "bad.csv", "-o", tmp_path / "out.csv")
    assert res.returncode == 1
    assert "bad.csv row 5: 31 values, expected 32" in res.stderr
    assert "Traceback" not in res.stderr
    np.save(tmp_path / "narrow.npy", X[:, :31])
    res = _cli(
        "--model-dir", model_dir, tmp_path / "narrow.npy", "-o", tmp_path / "out.npy", "--batch-size", "100"
    )
    assert res.returncode == 1
    assert "narrow.npy rows 1-100: input 'x': expected shape [?, 32], got [100, 31]" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "extracted-onnx", "narrow.npy"]


@pytest.mark.integration
def test_refuses_tampered_model_and_bad_usage(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    np.save(tmp_path / "in.npy", X[:3])
    (model_dir / "model.onnx").write_bytes(make_mlp_onnx(1))
    res = _cli("--model-dir", model_dir, tmp_path / "in.npy", "-o", tmp_path / "out.npy")
    assert res.returncode == 1 and "does not match the manifest's model_digest" in res.stderr
    res = _cli(tmp_path / "in.npy", "-o", tmp_path / "out.npy")
    assert res.returncode == 2 and "exactly one of --bundle or --model-dir" in res.stderr
    res = _cli("--model-dir", model_dir, tmp_path / "in.npy", "-o", tmp_path / "out.txt")
    assert res.returncode == 1 and "unsupported format .txt" in res.stderr


@pytest.mark.integration
@pytest.mark.parametrize("out", ["/nonexistent/dir/out.npy", "/nonexistent/dir/out.csv"])
def test_an_output_directory_that_does_not_exist_is_a_one_line_error(tmp_path: Path, out: str) -> None:
    np.save(tmp_path / "in.npy", X[:3])
    res = _cli("--model-dir", _model_dir(tmp_path), tmp_path / "in.npy", "-o", out)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "Error:" in res.stderr
    errors = [line for line in res.stderr.splitlines() if "Error:" in line]
    assert errors == [f"Error: cannot write {out}: directory /nonexistent/dir does not exist"]
    assert "runtime.loaded" not in res.stderr  # refused before the model was even loaded


@pytest.mark.integration
def test_labels_file_prints_accuracy_and_confusion(tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", X)
    pred = REF.argmax(axis=1)
    truth = np.where(np.arange(300) % 4 == 0, (pred + 1) % 4, pred)  # a quarter wrong
    np.savetxt(tmp_path / "labels.txt", truth, fmt="%d")
    res = _cli("--model-dir", _model_dir(tmp_path), tmp_path / "in.npy", "-o", tmp_path / "out.npy",
               "--labels", tmp_path / "labels.txt")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["task"] == "classification" and doc["labelled"] == 300 and doc["invalid"] == 0
    assert doc["accuracy"] == pytest.approx(0.75)
    expected = np.zeros((4, 4), int)
    np.add.at(expected, (truth, pred), 1)
    assert doc["confusion"] == expected.tolist()


@pytest.mark.integration
def test_labels_file_of_the_wrong_length_or_kind_is_a_clear_error(tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", X)
    np.save(tmp_path / "short.npy", np.zeros(299))
    model_dir = _model_dir(tmp_path)
    res = _cli("--model-dir", model_dir, tmp_path / "in.npy", "-o", tmp_path / "out.npy",
               "--labels", tmp_path / "short.npy")
    assert res.returncode == 2 and "299 labels for 300 input rows" in res.stderr
    (tmp_path / "words.txt").write_text("cat\ndog\n")
    res = _cli("--model-dir", model_dir, tmp_path / "in.npy", "-o", tmp_path / "out2.npy",
               "--labels", tmp_path / "words.txt")
    assert res.returncode == 1 and "cannot read labels" in res.stderr and "Traceback" not in res.stderr
