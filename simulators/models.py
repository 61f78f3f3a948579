"""Small deterministic test models (no training framework needed).

`make_mlp_onnx` builds the 32-64-64-4 MLP used across tests, benchmarks and the demo with
`onnx.helper`; weights come from a seeded generator so the same seed gives the same bytes,
and a different seed gives a model whose outputs miss another seed's golden vectors (the
cheapest "bad model" for rollback tests).
"""

from __future__ import annotations

import numpy as np


def mlp_weights(
    seed: int = 0, sizes: tuple[int, ...] = (32, 64, 64, 4)
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded (W, b) pairs for an MLP with the given layer sizes."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        layers.append((w, b))
    return layers


def mlp_reference(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The same MLP in numpy (ReLU between layers, logits out), for golden vectors."""
    h = x.astype(np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def make_mlp_onnx(
    seed: int = 0,
    sizes: tuple[int, ...] = (32, 64, 64, 4),
    input_name: str = "x",
    output_name: str = "logits",
    opset: int = 17,
) -> bytes:
    """Serialized ONNX model of a float32 MLP with a dynamic batch axis."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers = mlp_weights(seed, sizes)
    nodes = []
    inits = []
    prev = input_name
    for i, (w, b) in enumerate(layers):
        wn, bn, mm, add = f"W{i}", f"B{i}", f"mm{i}", f"add{i}"
        inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)]
        nodes.append(helper.make_node("MatMul", [prev, wn], [mm]))
        last = i == len(layers) - 1
        out = output_name if last else add
        nodes.append(helper.make_node("Add", [mm, bn], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [add], [f"relu{i}"]))
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "edgefleet_mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
