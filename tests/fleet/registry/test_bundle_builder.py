"""The bundle builder on real models: ONNX (onnxruntime) and TFLite (LiteRT), with int8 gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.contract.bundle import extract_bundle, read_manifest
from fleet.errors import FleetInputError, GateFailed
from fleet.registry.builder import BundleMetadata, QuantizationGate, build_bundle, describe_model
from simulators.models import make_mlp_onnx, make_mlp_tflite, mlp_reference, mlp_weights

REF = np.random.default_rng(7).standard_normal((600, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    (d / "mlp.onnx").write_bytes(make_mlp_onnx(0))
    (d / "mlp.tflite").write_bytes(make_mlp_tflite(0))
    (d / "junk.bin").write_bytes(b"this is not a model" * 10)
    return {"onnx": d / "mlp.onnx", "tflite": d / "mlp.tflite", "junk": d / "junk.bin"}


def _meta(**over: object) -> BundleMetadata:
    return BundleMetadata.model_validate({"name": "mlp", "version": "1.0.0", **over})


@pytest.mark.integration
@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_build_records_schema_golden_vectors_and_profile(
    models: dict[str, Path], tmp_path: Path, runtime: str
) -> None:
    steps: list[tuple[str, float]] = []
    names = [f"feat{i}" for i in range(32)]
    meta = _meta(feature_names=names, lineage={"training_code_ref": "git:abc"}, golden_count=16)
    out = build_bundle(
        models[runtime],
        meta,
        tmp_path / "b.efb",
        reference_data=REF,
        progress=lambda s, f: steps.append((s, f)),
    )
    done = extract_bundle(out, tmp_path / "x")
    m = done.manifest
    assert m.runtime == runtime and m.model_file == f"model.{runtime}"
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("x", "float32", [None, 32])]
    assert [(s.name, s.dtype, s.shape) for s in m.outputs] == [("logits", "float32", [None, 4])]
    assert m.compatibility.runtimes == [runtime]
    assert m.lineage.training_code_ref == "git:abc"
    golden_x = np.asarray(m.golden.inputs["x"], dtype=np.float32)
    assert golden_x.shape == (16, 32)
    # golden inputs are seeded rows of the reference data, expected outputs are the model's
    assert all(any(np.array_equal(row, r) for r in REF) for row in golden_x)
    np.testing.assert_allclose(
        np.asarray(m.golden.expected["logits"]), mlp_reference(golden_x, mlp_weights(0)), rtol=1e-4, atol=1e-4
    )
    prof = m.reference_profile
    assert [f.name for f in prof.features] == names
    assert [o.name for o in prof.outputs] == [f"logits_{i}" for i in range(4)]
    assert prof.sample_count == REF.shape[0] and prof.input_name == "x"
    assert steps[0][1] == 0.0 and steps[-1] == ("done", 1.0)
    assert m.created_at


@pytest.mark.integration
def test_build_without_reference_uses_seeded_inputs_and_explicit_golden(
    models: dict[str, Path], tmp_path: Path
) -> None:
    a = read_manifest(build_bundle(models["onnx"], _meta(seed=3), tmp_path / "a.efb", no_profile=True))
    b = read_manifest(build_bundle(models["onnx"], _meta(seed=3), tmp_path / "b.efb", no_profile=True))
    assert a.golden.inputs == b.golden.inputs and len(a.golden.inputs["x"]) == 16
    assert a.reference_profile.features == []
    rows = REF[:5]
    c = read_manifest(build_bundle(models["onnx"], _meta(), tmp_path / "c.efb", golden_inputs=rows,
                                   no_profile=True))
    np.testing.assert_array_equal(np.asarray(c.golden.inputs["x"], dtype=np.float32), rows)


@pytest.mark.integration
def test_bad_inputs_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FleetInputError, match="neither TFLite nor a valid ONNX"):
        build_bundle(models["junk"], _meta(), tmp_path / "x.efb")
    with pytest.raises(FleetInputError, match="3 feature_names for 32"):
        build_bundle(
            models["onnx"], _meta(feature_names=["a", "b", "c"]), tmp_path / "x.efb", reference_data=REF
        )
    with pytest.raises(FleetInputError, match=r"valid manifest: .*version"):
        build_bundle(models["onnx"], _meta(version="one"), tmp_path / "x.efb", no_profile=True)
    with pytest.raises(FleetInputError, match="ONNX models only"):
        build_bundle(models["tflite"], _meta(quantize="dynamic"), tmp_path / "x.efb")
    with pytest.raises(FleetInputError, match="static quantization needs"):
        build_bundle(models["onnx"], _meta(quantize="static"), tmp_path / "x.efb")
    with pytest.raises(FleetInputError, match="categorical names \\['nope'\\]"):
        build_bundle(models["onnx"], _meta(categorical={"nope": []}), tmp_path / "x.efb", reference_data=REF)
    with pytest.raises(FleetInputError, match="must be numeric"):
        build_bundle(models["onnx"], _meta(), tmp_path / "x.efb", reference_data=REF.astype(str))
    with pytest.raises(FleetInputError, match=r"no reference data: pass --reference-data .* or --no-profile"):
        build_bundle(models["onnx"], _meta(), tmp_path / "x.efb")
    with pytest.raises(FleetInputError, match="dynamic quantization needs reference data"):
        build_bundle(models["onnx"], _meta(quantize="dynamic"), tmp_path / "x.efb", no_profile=True)
    assert list(tmp_path.iterdir()) == []
    bad = tmp_path / "meta.json"
    bad.write_text(json.dumps({"name": "mlp", "version": "1.0.0", "colour": "red", "bins": 0}))
    with pytest.raises(FleetInputError, match=r"colour.*|bins"):
        BundleMetadata.from_json_file(bad)


@pytest.mark.integration
def test_categorical_feature_codes_are_profiled_as_categories(
    models: dict[str, Path], tmp_path: Path
) -> None:
    ref = REF.copy()
    ref[:, 0] = np.arange(ref.shape[0]) % 3  # a categorical column carried as integer codes
    m = read_manifest(
        build_bundle(models["onnx"], _meta(categorical={"f0": []}), tmp_path / "c.efb", reference_data=ref)
    )
    f0 = m.reference_profile.features[0]
    assert f0.name == "f0" and f0.kind == "categorical" and len(f0.vocabulary) == 3
    assert m.reference_profile.features[1].kind == "numeric"


@pytest.mark.unit
def test_describe_model_reads_specs_from_the_bytes() -> None:
    runtime, inputs, outputs = describe_model(make_mlp_onnx(1, sizes=(8, 16, 3), input_name="feats"))
    assert runtime == "onnx"
    assert (inputs[0].name, inputs[0].shape, outputs[0].shape) == ("feats", [None, 8], [None, 3])


@pytest.mark.integration
@pytest.mark.parametrize(("mode", "scheme"), [("dynamic", "int8-dynamic"), ("static", "int8-static")])
def test_int8_quantization_passes_its_gate(
    models: dict[str, Path], tmp_path: Path, mode: str, scheme: str
) -> None:
    out = build_bundle(models["onnx"], _meta(quantize=mode), tmp_path / "q.efb", reference_data=REF)
    done = extract_bundle(out, tmp_path / "x")
    q = done.manifest.quantization
    assert q.scheme == scheme
    assert q.agreement is not None and q.agreement >= 0.97
    assert q.calibration["holdout_rows"] == 150
    assert q.calibration["mean_abs_delta"] <= 0.1
    assert done.manifest.model_size < models["onnx"].stat().st_size
    # golden vectors are the *quantized* model's outputs, which the device will run
    import onnxruntime as ort

    sess = ort.InferenceSession(done.model_path.read_bytes(), providers=["CPUExecutionProvider"])
    x = np.asarray(done.manifest.golden.inputs["x"], dtype=np.float32)
    np.testing.assert_allclose(
        sess.run(None, {"x": x})[0], np.asarray(done.manifest.golden.expected["logits"]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.integration
def test_int8_gate_refuses_with_figures(models: dict[str, Path], tmp_path: Path) -> None:
    meta = _meta(quantize="static", quantization_gate=QuantizationGate(max_mean_abs_delta=1e-7))
    with pytest.raises(GateFailed, match="mean abs delta") as err:
        build_bundle(models["onnx"], meta, tmp_path / "q.efb", reference_data=REF)
    assert err.value.figures["mean_abs_delta"] > 1e-7
    assert 0.0 <= err.value.figures["label_agreement"] <= 1.0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
@pytest.mark.parametrize(("runtime", "quantize"), [("onnx", "none"), ("onnx", "static"), ("tflite", "none")])
def test_agent_runtime_loads_the_bundle_and_meets_its_golden_vectors(
    models: dict[str, Path], tmp_path: Path, runtime: str, quantize: str
) -> None:
    from agent.runtimes import load_model

    out = build_bundle(models[runtime], _meta(quantize=quantize), tmp_path / "b.efb", reference_data=REF)
    done = extract_bundle(out, tmp_path / "slot")
    loaded = load_model(done.model_path, done.manifest)
    try:
        golden = done.manifest.golden
        got = loaded.predict({k: np.asarray(v, dtype=np.float32) for k, v in golden.inputs.items()})
        for name, expected in golden.expected.items():
            np.testing.assert_allclose(got[name], np.asarray(expected), rtol=golden.rtol, atol=golden.atol)
    finally:
        loaded.close()
