"""Runtimes against the numpy reference, and request validation's error messages."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.contract.manifest import Manifest
from agent.errors import InputValidationError, MisuseError, RuntimeFailure
from agent.runtimes import LoadedModel, available_runtimes, load_model, validate_inputs
from simulators.models import make_mlp_onnx, make_mlp_tflite, mlp_manifest, mlp_reference, mlp_weights

X = np.random.default_rng(7).standard_normal((17, 32)).astype(np.float32)


def _write(tmp_path: Path, runtime: str, data: bytes) -> tuple[Path, Manifest]:
    path = tmp_path / f"model.{runtime}"
    path.write_bytes(data)
    return path, mlp_manifest(data, runtime=runtime)


@pytest.fixture(params=["onnx", "tflite"])
def model(request: pytest.FixtureRequest, tmp_path: Path) -> LoadedModel:
    data = make_mlp_onnx(0) if request.param == "onnx" else make_mlp_tflite(0)
    loaded = load_model(*_write(tmp_path, request.param, data))
    yield loaded
    loaded.close()


@pytest.mark.integration
def test_outputs_match_reference_for_any_batch(model: LoadedModel) -> None:
    ref = mlp_reference(X, mlp_weights(0))
    for rows in (1, 17, 3, 1):  # shrinking and growing batches exercise LiteRT's resize
        out = model.predict({"x": X[:rows]})
        assert list(out) == ["logits"]
        assert out["logits"].shape == (rows, 4)
        np.testing.assert_allclose(out["logits"], ref[:rows], rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_float64_lists_are_cast(model: LoadedModel) -> None:
    out = model.predict({"x": X[:2].astype(np.float64).tolist()})
    np.testing.assert_allclose(out["logits"], mlp_reference(X[:2], mlp_weights(0)), rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_concurrent_predicts_are_consistent(model: LoadedModel) -> None:
    ref = mlp_reference(X, mlp_weights(0))
    errors: list[str] = []

    def worker(rows: int) -> None:
        for _ in range(50):
            got = model.predict({"x": X[:rows]})["logits"]
            if got.shape != (rows, 4) or not np.allclose(got, ref[:rows], atol=1e-5):
                errors.append(f"rows={rows}")

    threads = [threading.Thread(target=worker, args=(r,)) for r in (1, 5, 17, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.integration
def test_int8_tflite_agrees_with_float(tmp_path: Path) -> None:
    data = make_mlp_tflite(0, quantize_int8=True)
    assert len(data) < len(make_mlp_tflite(0)) / 2
    loaded = load_model(*_write(tmp_path, "tflite", data))
    x = np.random.default_rng(3).standard_normal((1000, 32)).astype(np.float32)
    got = loaded.predict({"x": x})["logits"]
    ref = mlp_reference(x, mlp_weights(0))
    assert np.abs(got - ref).mean() < 0.02
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


@pytest.mark.integration
@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_corrupt_model_is_runtime_failure(tmp_path: Path, runtime: str) -> None:
    data = (make_mlp_onnx(0) if runtime == "onnx" else make_mlp_tflite(0))[:500]
    with pytest.raises(RuntimeFailure, match="could not load"):
        load_model(*_write(tmp_path, runtime, data))


@pytest.mark.integration
def test_model_disagreeing_with_manifest_is_refused(tmp_path: Path) -> None:
    data = make_mlp_onnx(0, input_name="features")
    with pytest.raises(RuntimeFailure, match="do not match the manifest"):
        load_model(*_write(tmp_path, "onnx", data))


@pytest.mark.integration
def test_missing_file_is_misuse(tmp_path: Path) -> None:
    with pytest.raises(MisuseError):
        load_model(tmp_path / "model.onnx", mlp_manifest(b"x"))


@pytest.mark.unit
def test_available_runtimes() -> None:
    assert available_runtimes() == ["onnx", "tflite"]


MANIFEST = mlp_manifest(b"not used")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"y": X}, r"missing input\(s\) \['x'\]; unknown input\(s\) \['y'\]"),
        ({}, r"missing input\(s\) \['x'\]"),
        ({"x": X, "z": X}, r"unknown input\(s\) \['z'\]"),
        ({"x": X.astype(np.complex64)}, r"'x': expected dtype float32, got complex64"),
        ({"x": [["a"] * 32]}, r"'x': expected dtype float32, got <U1"),
        ({"x": X[0]}, r"'x': expected rank 2 .* got rank 1 with shape \[32\] \(wrap a single example"),
        ({"x": X[:, :31]}, r"'x': expected shape \[\?, 32\], got \[17, 31\] \(axis 1 is 31, expected 32\)"),
        ({"x": X[:0]}, r"'x': empty batch"),
        ({"x": [[1.0] * 32, [1.0] * 31]}, r"'x': not a rectangular numeric array"),
        ("x", r"inputs must be an object"),
    ],
)
def test_validation_messages(inputs: object, message: str) -> None:
    with pytest.raises(InputValidationError, match=message):
        validate_inputs(MANIFEST, inputs)  # type: ignore[arg-type]


@pytest.mark.unit
def test_validation_casts_only_safely() -> None:
    ok = validate_inputs(MANIFEST, {"x": np.ones((2, 32), dtype=np.int64)})
    assert ok["x"].dtype == np.float32
    ints = MANIFEST.model_copy(update={"inputs": [MANIFEST.inputs[0].model_copy(update={"dtype": "int8"})]})
    assert validate_inputs(ints, {"x": np.full((1, 32), 5)})["x"].dtype == np.int8
    with pytest.raises(InputValidationError, match=r"values \[300, 300\] do not fit dtype int8"):
        validate_inputs(ints, {"x": np.full((1, 32), 300)})
    with pytest.raises(InputValidationError, match="would lose information"):
        validate_inputs(ints, {"x": np.ones((1, 32), dtype=np.float32)})
