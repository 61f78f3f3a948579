"""Bytes a device fetches with delta bundles, over the full bundle, for three kinds of new model.

A ~7 MB int8 MLP (256-2048-2048-1024-10, built with the onnx helper, quantized to int8 QDQ by
the project's own `fleet.registry.quantize.quantize_onnx`, static calibration) is published as
version 1; then three version-2 bundles, each delta'd from version 1 by the fleet's real path
(`fleet.registry.deltas.DeltaCatalog.ensure` on a real TUF repository: both formats, the
smaller one, refused above 60 % of the full bundle):

- head: only the last layer retrained (float weights from another seed), re-quantized;
- finetune: every int8 weight nudged (about 1 entry in 4 moved by one step: noise N(0, 0.4)
  rounded), quantization scales and zero points frozen: what a fine-tune that keeps its
  calibration gives;
- full: every layer from another seed, re-quantized (must fall back: ratio 1.0).

`delta_ratio_*` is bytes fetched / full-bundle bytes (1.0 when no delta is published);
`delta_raw_ratio_full` is the best delta's size even though it is not shipped. The agent's
rebuild (re-create the base bundle from its slot, apply the delta, hash the result) is timed
against the baseline of reading and hashing the full bundle from disk, in the same run.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.contract.bundle import extract_bundle, rebuild_bundle, write_bundle
from agent.contract.delta import apply_delta
from agent.contract.director import TargetRef
from agent.contract.manifest import TensorSpec
from fleet.registry.deltas import DeltaCatalog, build_delta
from fleet.registry.quantize import QuantizationGate, quantize_onnx
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from simulators.models import mlp_manifest, mlp_weights

NAME = "delta"
DESCRIPTION = "delta bundles: bytes fetched vs full bundle (head / fine-tune / full retrain), rebuild time"

SIZES = (256, 2048, 2048, 1024, 10)
REPEATS = 3


def _onnx(layers: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, prev = [], [], "x"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"]))
        last = i == len(layers) - 1
        nodes.append(helper.make_node("Add", [f"mm{i}", f"B{i}"], ["logits" if last else f"add{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"add{i}"], [f"relu{i}"]))
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes, "bench_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SIZES[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", SIZES[-1]])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _quantized(layers: list[tuple[np.ndarray, np.ndarray]], reference: np.ndarray) -> bytes:
    gate = QuantizationGate(min_label_agreement=0.0, max_abs_delta=1e9, max_mean_abs_delta=1e9)
    spec_in = [TensorSpec(name="x", dtype="float32", shape=[None, SIZES[0]])]
    spec_out = [TensorSpec(name="logits", dtype="float32", shape=[None, SIZES[-1]])]
    model, _ = quantize_onnx(_onnx(layers), spec_in, spec_out, "static", gate, 0, reference)
    return model


def _frozen_scale_finetune(model: bytes, seed: int) -> bytes:
    """Nudge every int8 weight tensor, keeping scales and zero points (a calibration-frozen fine-tune)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model)
    rng = np.random.default_rng(seed)
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.int8 and arr.size > 1024:
            step = np.rint(rng.normal(0.0, 0.4, arr.shape)).astype(np.int16)
            new = np.clip(arr.astype(np.int16) + step, -127, 127).astype(np.int8)
            init.CopyFrom(numpy_helper.from_array(new, init.name))
    return bytes(proto.SerializeToString())


def _median(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _read_full(path: Path) -> None:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            sha.update(data)


def run() -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    try:
        rng = np.random.default_rng(7)
        reference = rng.standard_normal((256, SIZES[0])).astype(np.float32)
        base_layers = mlp_weights(0, SIZES)
        other = mlp_weights(1, SIZES)
        base = _quantized(base_layers, reference)
        models = {
            "head": _quantized([*base_layers[:-1], other[-1]], reference),
            "finetune": _frozen_scale_finetune(base, 3),
            "full": _quantized(other, reference),
        }
        repo = Repository(work / "repo", KeyStore(work / "keys"))
        repo.init(root_threshold=1, root_keys=1)
        catalog = DeltaCatalog(repo)

        def publish(version: str, model: bytes) -> tuple[Path, TargetRef]:
            out = work / f"mlp-{version}.efb"
            write_bundle(mlp_manifest(model, version=version, sizes=SIZES), model, out)
            ref = repo.add_target(out, f"models/mlp/mlp-{version}.efb", {"name": "mlp", "version": version})
            return out, ref

        base_file, base_ref = publish("1.0.0", base)
        slot = extract_bundle(base_file, work / "slot", durable=False)  # what the device keeps
        out: dict[str, float] = {"delta_model_int8_mb": len(base) / 1e6}
        full_file = base_file
        for i, (kind, model) in enumerate(models.items()):
            full_file, full_ref = publish(f"2.0.{i}", model)
            full_len = full_file.stat().st_size
            t0 = time.perf_counter()
            deltas = catalog.ensure(full_ref, [base_ref])  # both formats, verified, signed
            out[f"delta_fleet_build_s_{kind}"] = time.perf_counter() - t0
            delta = deltas.get("mlp-1.0.0")
            out[f"delta_ratio_{kind}"] = (delta.length if delta else full_len) / full_len
            if delta is None:  # not shipped: how large the best delta would have been
                out[f"delta_raw_ratio_{kind}"] = len(build_delta(base_file, full_file).data) / full_len
                continue
            out[f"delta_format_{kind}_is_tensor_diff"] = float(delta.format == "tensor-diff")
            dirname, _, name = delta.path.rpartition("/")
            delta_file = repo.targets_dir / dirname / f"{delta.sha256}.{name}"

            def rebuild(full_sha: str = full_ref.sha256, length: int = full_len,
                        d: Path = delta_file) -> None:
                scratch = work / "scratch"
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir()
                b = rebuild_bundle((slot.root / "manifest.json").read_bytes(), slot.model_path,
                                   slot.manifest.model_file, scratch / "base.efb")
                apply_delta(b, d, scratch / "new.efb", expected_sha256=full_sha, expected_length=length)

            out[f"delta_rebuild_ms_{kind}"] = _median(rebuild) * 1e3
        out["delta_full_bundle_mb"] = full_file.stat().st_size / 1e6
        out["delta_read_full_ms"] = _median(lambda: _read_full(full_file)) * 1e3
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
