"""Small deterministic test models (no training framework needed).

`make_mlp_onnx` builds the 32-64-64-4 MLP used across tests, benchmarks and the demo with
`onnx.helper`; weights come from a seeded generator so the same seed gives the same bytes,
and a different seed gives a model whose outputs miss another seed's golden vectors (the
cheapest "bad model" for rollback tests).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from agent.contract.manifest import Manifest


def mlp_weights(
    seed: int = 0, sizes: tuple[int, ...] = (32, 64, 64, 4)
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded (W, b) pairs for an MLP with the given layer sizes."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes):
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
    softmax: bool = False,
) -> bytes:
    """Serialized ONNX model of a float32 MLP with a dynamic batch axis (`softmax`: probabilities out)."""
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
        out = (f"{output_name}_logits" if softmax else output_name) if last else add
        nodes.append(helper.make_node("Add", [mm, bn], [out]))
        if last and softmax:
            nodes.append(helper.make_node("Softmax", [out], [output_name], axis=-1))
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
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _tflite_quant(scale: float, zero_point: int) -> Any:
    from ai_edge_litert import schema_py_generated as tfl

    q = tfl.QuantizationParametersT()
    q.scale = [float(scale)]
    q.zeroPoint = [int(zero_point)]
    return q


def _activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 parameters covering [lo, hi] (widened to include 0, as TFLite requires)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zero_point


def make_mlp_tflite(
    seed: int = 0,
    sizes: tuple[int, ...] = (32, 64, 64, 4),
    quantize_int8: bool = False,
    input_name: str = "x",
    output_name: str = "logits",
) -> bytes:
    """TFLite flatbuffer of the `mlp_weights(seed)` MLP, written without TensorFlow.

    FULLY_CONNECTED ops (weights stored `[out, in]`) with fused ReLU and a dynamic batch
    axis (`shape_signature` -1). With `quantize_int8`, weights are symmetric per-tensor int8,
    activations asymmetric int8 calibrated on 2,048 seeded normal inputs, biases int32, and the
    graph keeps float32 input/output through QUANTIZE/DEQUANTIZE so callers see the same schema.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as tfl

    layers = mlp_weights(seed, sizes)
    buffers: list[Any] = [tfl.BufferT()]  # buffer 0 is the empty sentinel by convention
    tensors: list[Any] = []

    def add_tensor(
        name: str,
        shape: list[int],
        ttype: int,
        data: np.ndarray | None = None,
        quant: Any = None,
        batch: bool = False,
    ) -> int:
        buf = tfl.BufferT()
        if data is not None:
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
        buffers.append(buf)
        t = tfl.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), ttype, len(buffers) - 1
        if batch:
            t.shapeSignature = [-1, *shape[1:]]
        t.quantization = quant
        tensors.append(t)
        return len(tensors) - 1

    codes = {
        op: i
        for i, op in enumerate(
            [
                tfl.BuiltinOperator.FULLY_CONNECTED,
                tfl.BuiltinOperator.QUANTIZE,
                tfl.BuiltinOperator.DEQUANTIZE,
            ]
        )
    }
    operators: list[Any] = []

    def add_op(code: int, inputs: list[int], outputs: list[int], relu: bool | None = None) -> None:
        op = tfl.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = codes[code], inputs, outputs
        if relu is not None:
            opts = tfl.FullyConnectedOptionsT()
            opts.fusedActivationFunction = tfl.ActivationFunctionType.RELU if relu else 0
            op.builtinOptionsType, op.builtinOptions = tfl.BuiltinOptions.FullyConnectedOptions, opts
        operators.append(op)

    x_in = add_tensor(input_name, [1, sizes[0]], tfl.TensorType.FLOAT32, batch=True)
    if not quantize_int8:
        prev = x_in
        for i, (w, b) in enumerate(layers):
            last = i == len(layers) - 1
            wt = add_tensor(f"W{i}", [w.shape[1], w.shape[0]], tfl.TensorType.FLOAT32, w.T)
            bt = add_tensor(f"B{i}", [b.shape[0]], tfl.TensorType.FLOAT32, b)
            out = add_tensor(
                output_name if last else f"h{i}", [1, w.shape[1]], tfl.TensorType.FLOAT32, batch=True
            )
            add_op(tfl.BuiltinOperator.FULLY_CONNECTED, [prev, wt, bt], [out], relu=not last)
            prev = out
        graph_out = prev
    else:
        calib = np.random.default_rng(seed + 10_000).standard_normal((2048, sizes[0])).astype(np.float32)
        acts = [calib]
        for i in range(len(layers)):
            acts.append(
                mlp_reference(calib, layers[: i + 1])
                if i == len(layers) - 1
                else np.maximum(mlp_reference(calib, layers[: i + 1]), 0.0)
            )
        s_prev, zp_prev = _activation_qparams(float(calib.min()), float(calib.max()))
        prev = add_tensor(
            f"{input_name}_int8",
            [1, sizes[0]],
            tfl.TensorType.INT8,
            quant=_tflite_quant(s_prev, zp_prev),
            batch=True,
        )
        add_op(tfl.BuiltinOperator.QUANTIZE, [x_in], [prev])
        for i, (w, b) in enumerate(layers):
            last = i == len(layers) - 1
            s_w = max(float(np.abs(w).max()), 1e-8) / 127.0
            w_q = np.clip(np.round(w.T / s_w), -127, 127).astype(np.int8)
            s_b = s_prev * s_w
            b_q = np.round(b / s_b).astype(np.int32)
            wt = add_tensor(
                f"W{i}", [w.shape[1], w.shape[0]], tfl.TensorType.INT8, w_q, _tflite_quant(s_w, 0)
            )
            bt = add_tensor(f"B{i}", [b.shape[0]], tfl.TensorType.INT32, b_q, _tflite_quant(s_b, 0))
            a = acts[i + 1]
            s_out, zp_out = _activation_qparams(float(a.min()), float(a.max()))
            out = add_tensor(
                f"h{i}_int8",
                [1, w.shape[1]],
                tfl.TensorType.INT8,
                quant=_tflite_quant(s_out, zp_out),
                batch=True,
            )
            add_op(tfl.BuiltinOperator.FULLY_CONNECTED, [prev, wt, bt], [out], relu=not last)
            prev, s_prev = out, s_out
        graph_out = add_tensor(output_name, [1, sizes[-1]], tfl.TensorType.FLOAT32, batch=True)
        add_op(tfl.BuiltinOperator.DEQUANTIZE, [prev], [graph_out])

    subgraph = tfl.SubGraphT()
    subgraph.name, subgraph.tensors, subgraph.operators = "main", tensors, operators
    subgraph.inputs, subgraph.outputs = [x_in], [graph_out]
    model = tfl.ModelT()
    model.version, model.description = 3, "edgefleet_mlp"
    model.subgraphs, model.buffers = [subgraph], buffers
    model.operatorCodes = []
    for code in codes:
        oc = tfl.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
        model.operatorCodes.append(oc)
    builder = flatbuffers.Builder(32 * 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def mlp_manifest(
    model: bytes,
    runtime: str = "onnx",
    name: str = "mlp",
    version: str = "1.0.0",
    sizes: tuple[int, ...] = (32, 64, 64, 4),
) -> Any:
    """A minimal valid `Manifest` for an MLP made here (input `x`, output `logits`, dynamic batch)."""
    import hashlib

    return Manifest.model_validate(
        {
            "name": name,
            "version": version,
            "runtime": runtime,
            "model_file": f"model.{runtime}",
            "model_digest": "sha256:" + hashlib.sha256(model).hexdigest(),
            "model_size": len(model),
            "inputs": [{"name": "x", "dtype": "float32", "shape": [None, sizes[0]]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, sizes[-1]]}],
        }
    )
