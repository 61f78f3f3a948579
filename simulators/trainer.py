"""The small trainer shipped with the simulators: a numpy MLP fitted on the collected data.

Usable as a training policy's Python entry point (`simulators.trainer:train`, docs/training.md):
it reads the parent model's layers from `parent.onnx` (the MatMul/Add/Relu chain
`simulators.models.make_mlp_onnx` builds), fine-tunes them with full-batch Adam on the reference
rows plus the collected rows (cross-entropy on the labels), and writes the same graph with the
new weights (same input and output names and shapes, so the cohort's devices accept it) and
its metrics. `oracle_labels` is the simulators' labeler: the data generator's ground truth
(argmax of the truth MLP, seed `EDGEFLEET_SIM_TRUTH_SEED`, default 1), standing in for the
human labelling a real deployment does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fleet.training.interface import TrainerJob
from simulators.models import mlp_reference, mlp_weights

Layers = list[tuple[np.ndarray, np.ndarray]]


def oracle_labels(x: np.ndarray) -> np.ndarray:
    """Ground-truth classes of rows `x` (the truth MLP's argmax)."""
    truth = mlp_weights(int(os.environ.get("EDGEFLEET_SIM_TRUTH_SEED", "1")))
    return np.argmax(mlp_reference(np.asarray(x, np.float32), truth), axis=1).astype(np.int64)


def read_layers(model: bytes) -> tuple[Layers, str, str]:
    """(W, b) per layer, and the input and output names, of a make_mlp_onnx graph."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(model)
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    mats = [n for n in m.graph.node if n.op_type == "MatMul"]
    adds = [n for n in m.graph.node if n.op_type == "Add"]
    if not mats or len(mats) != len(adds) or any(n.op_type not in ("MatMul", "Add", "Relu", "Softmax")
                                                  for n in m.graph.node):
        raise ValueError("parent.onnx is not a MatMul/Add/Relu MLP")
    layers = [(init[mm.input[1]].astype(np.float32), init[ad.input[1]].astype(np.float32))
              for mm, ad in zip(mats, adds, strict=True)]
    return layers, m.graph.input[0].name, m.graph.output[0].name


def to_onnx(layers: Layers, input_name: str, output_name: str) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, prev = [], [], input_name
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"B{i}")]
        last = i == len(layers) - 1
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"B{i}"], [output_name if last else f"add{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"add{i}"], [f"relu{i}"]))
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes, "edgefleet_retrained_mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", layers[0][0].shape[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", layers[-1][0].shape[1]])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def fit(layers: Layers, x: np.ndarray, y: np.ndarray, steps: int = 300, lr: float = 0.01,
        seed: int = 0, progress: object = None) -> Layers:
    """Full-batch Adam on softmax cross-entropy, from `layers`."""
    params = [p.astype(np.float64).copy() for wb in layers for p in wb]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    onehot = np.eye(layers[-1][0].shape[1])[y]
    xs = x.astype(np.float64)
    for t in range(1, steps + 1):
        acts, h = [xs], xs
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i < len(params) - 2:
                h = np.maximum(h, 0.0)
            acts.append(h)
        z = acts[-1] - acts[-1].max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        g = (p - onehot) / len(xs)
        grads: list[np.ndarray] = [np.zeros(0)] * len(params)
        for i in range(len(params) - 2, -1, -2):
            grads[i], grads[i + 1] = acts[i // 2].T @ g, g.sum(axis=0)
            if i:
                g = (g @ params[i].T) * (acts[i // 2] > 0)
        for k, gk in enumerate(grads):
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.999 * v[k] + 0.001 * gk * gk
            params[k] -= lr * (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8)
        if callable(progress) and t % 50 == 0:
            progress(t / steps, f"step {t}/{steps}")
    return [(params[i].astype(np.float32), params[i + 1].astype(np.float32))
            for i in range(0, len(params), 2)]


def predict(layers: Layers, x: np.ndarray) -> np.ndarray:
    return np.argmax(mlp_reference(x, layers), axis=1)


def train(job: TrainerJob) -> dict[str, float]:
    """The entry point: fine-tune the parent on reference + collected rows (module docstring)."""
    layers, in_name, out_name = read_layers(Path(job.parent_model).read_bytes())
    with np.load(job.reference) as r, np.load(job.train) as c:
        rx, ry, cx, cy = r["x"], r["y"], c["x"], c["y"]
    x, y = np.concatenate([rx, cx]).astype(np.float32), np.concatenate([ry, cy]).astype(np.int64)
    steps = int(os.environ.get("EDGEFLEET_SIM_TRAIN_STEPS", "300"))
    job.progress(0.0, f"fitting {len(x)} rows ({len(cx)} collected)")
    new = fit(layers, x, y, steps=steps, seed=job.seed, progress=job.progress)
    (Path(job.out_dir) / "model.onnx").write_bytes(to_onnx(new, in_name, out_name))
    metrics = {"train_accuracy": float(np.mean(predict(new, x) == y)),
               "train_accuracy_collected": float(np.mean(predict(new, cx) == cy)) if len(cx) else 0.0,
               "parent_accuracy_collected": float(np.mean(predict(layers, cx) == cy)) if len(cx) else 0.0,
               "rows": float(len(x)), "rows_collected": float(len(cx))}
    job.progress(1.0, json.dumps(metrics))
    return metrics


def pretrain(reference: Path, out: Path, steps: int = 200, seed: int = 0) -> dict[str, float]:
    """Fit a fresh MLP (seeded weights) on a reference `.npz` (`x`, `y`) and write its ONNX:
    the first version of a scenario, accurate where its training data lies and not beyond."""
    with np.load(reference) as r:
        x, y = r["x"].astype(np.float32), r["y"].astype(np.int64)
    layers = fit(mlp_weights(seed), x, y, steps=steps, seed=seed)
    out.write_bytes(to_onnx(layers, "x", "logits"))
    return {"train_accuracy": float(np.mean(predict(layers, x) == y))}


if __name__ == "__main__":  # `python -m simulators.trainer pretrain REF.npz OUT.onnx [STEPS]`
    import sys

    if len(sys.argv) not in (4, 5) or sys.argv[1] != "pretrain":
        print("usage: python -m simulators.trainer pretrain REF.npz OUT.onnx [STEPS]", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(pretrain(Path(sys.argv[2]), Path(sys.argv[3]),
                              int(sys.argv[4]) if len(sys.argv) == 5 else 200)))
