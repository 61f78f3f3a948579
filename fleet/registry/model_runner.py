"""Describe and run a model with its real runtime (onnxruntime or LiteRT), from its bytes.

Why a module of its own: the bundle builder (golden vectors, reference profile) and the int8
quantizer (the float-vs-int8 gate) both run the operator's model, and the builder calls the
quantizer, so the shared runner lives below both instead of the quantizer reaching back into
the builder. The runtimes load on first use (they are large and only builds need them).

Errors: every public function raises `FleetInputError` when the model or its inputs are refused
(an operator's model that a runtime cannot load or run is the operator's input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from agent.contract.manifest import Runtime, TensorSpec
from fleet.errors import FleetInputError

_ONNX_DTYPES = {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}


def detect_runtime(model: bytes) -> Runtime:
    """`tflite` if the flatbuffer identifier says so, `onnx` if it parses and checks as ONNX.

    Raises `FleetInputError` when it is neither.
    """
    if len(model) >= 8 and model[4:8] == b"TFL3":
        return "tflite"
    import onnx

    try:
        proto = onnx.load_model_from_string(model)
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ...: all mean "not a model"
        raise FleetInputError(f"model is neither TFLite nor a valid ONNX model: {exc}") from None
    if not proto.graph.node:
        raise FleetInputError("model is neither TFLite nor a valid ONNX model (empty graph)")
    return "onnx"


def _onnx_specs(model: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx
    from onnx import helper

    graph = onnx.load_model_from_string(model).graph
    inits = {i.name for i in graph.initializer}

    def spec(value: Any) -> TensorSpec:
        ttype = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
        if dtype not in _ONNX_DTYPES:
            raise FleetInputError(f"tensor {value.name!r} has unsupported dtype {dtype}")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim]
        return TensorSpec.model_validate({"name": value.name, "dtype": dtype, "shape": dims or [1]})

    return [spec(v) for v in graph.input if v.name not in inits], [spec(v) for v in graph.output]


def _tflite_interpreter(model: bytes) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    try:
        return Interpreter(model_content=model)
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError on a bad flatbuffer
        raise FleetInputError(f"LiteRT cannot load the model: {exc}") from None


def _tflite_specs(model: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    interp = _tflite_interpreter(model)

    def spec(d: dict[str, Any]) -> TensorSpec:
        dtype = np.dtype(d["dtype"]).name
        if dtype not in _ONNX_DTYPES:
            raise FleetInputError(f"tensor {d['name']!r} has unsupported dtype {dtype}")
        sig = d.get("shape_signature")
        dims = list(sig if sig is not None and len(sig) else d["shape"])
        shape: list[int | None] = [int(x) if x > 0 else None for x in dims] or [1]
        return TensorSpec.model_validate({"name": d["name"], "dtype": dtype, "shape": shape})

    return [spec(d) for d in interp.get_input_details()], [spec(d) for d in interp.get_output_details()]


def describe_model(model: bytes) -> tuple[Runtime, list[TensorSpec], list[TensorSpec]]:
    """Runtime and input/output specs (dynamic axes as `None`). Raises `FleetInputError`."""
    runtime = detect_runtime(model)
    inputs, outputs = _onnx_specs(model) if runtime == "onnx" else _tflite_specs(model)
    if not inputs or not outputs:
        raise FleetInputError("model declares no inputs or no outputs")
    return runtime, inputs, outputs


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def make_runner(model: bytes, runtime: Runtime) -> Runner:
    """Load the model once with its real runtime; the runner maps feeds to outputs by name.

    Raises `FleetInputError` if the runtime refuses the model (now) or the inputs (when run).
    """
    try:
        if runtime == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]

            def run_onnx(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return dict(zip(names, sess.run(names, feeds), strict=True))

            runner: Runner = run_onnx
        else:
            interp = _tflite_interpreter(model)
            runner = lambda feeds: _run_tflite(interp, feeds)  # noqa: E731
    except FleetInputError:
        raise
    except Exception as exc:  # runtime errors on a model the operator supplied are input errors
        raise FleetInputError(f"{runtime} runtime cannot load the model: {exc}") from None

    def guarded(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return runner(feeds)
        except Exception as exc:  # same: a model/input mismatch is the operator's input
            raise FleetInputError(f"{runtime} runtime failed to run the model: {exc}") from None

    return guarded


def run_model(model: bytes, runtime: Runtime, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the model once on `feeds` with the real runtime. Raises `FleetInputError`."""
    return make_runner(model, runtime)(feeds)


def _run_tflite(interp: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = next(iter(feeds.values())).shape[0]
    for d in interp.get_input_details():
        interp.resize_tensor_input(d["index"], [n, *feeds[d["name"]].shape[1:]])
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], feeds[d["name"]].astype(d["dtype"]))
    interp.invoke()
    return {d["name"]: np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()}
