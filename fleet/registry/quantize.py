"""Int8 quantization of ONNX models with a validation gate against the float model.

`onnxruntime.quantization` does the work (`quantize_dynamic`, or `quantize_static` with a
`CalibrationDataReader` over reference rows after `quant_pre_process(skip_symbolic_shape=True)`,
which avoids needing sympy). The gate then runs the float and the int8 model on held-out rows
the calibration never saw and refuses the build (`GateFailed`, figures attached) when top-1
agreement or the output deltas exceed the metadata's `QuantizationGate` for the output's kind
(probabilities, logits, regression: `fleet.registry.quant_gate`), or when the int8 model is
larger than the float one (unless the gate allows it). The kind, limits, figures and any
warning (int8 not smaller) are recorded in the manifest's `quantization.calibration`.

The gate's settings and decisions live in `quant_gate` (the builder's `BundleMetadata` holds a
`QuantizationGate`) and the model runner is `fleet.registry.model_runner`, so this module never
imports the builder that calls it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.contract.manifest import Quantization, TensorSpec
from agent.logs import log_event
from fleet.errors import FleetInputError, GateFailed
from fleet.registry.model_runner import run_model
from fleet.registry.quant_gate import QuantizationGate, judge, resolve_kind

log = logging.getLogger("edgefleet.fleet.quantize")
_BATCH = 32
_SYNTHETIC_ROWS = 256

QuantizeMode = Literal["none", "dynamic", "static"]


def _split(
    reference: np.ndarray | None, spec: TensorSpec, mode: QuantizeMode, gate: QuantizationGate, seed: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """(calibration rows, held-out rows); seeded so the same inputs give the same bundle."""
    rng = np.random.default_rng(seed)
    if reference is None:
        if mode == "static":
            raise FleetInputError("static quantization needs --reference-data for calibration")
        shape = [_SYNTHETIC_ROWS if i == 0 and d is None else (d or 1) for i, d in enumerate(spec.shape)]
        return None, rng.standard_normal(shape).astype(spec.dtype)
    reference = np.asarray(reference)
    if reference.ndim != 2:
        raise FleetInputError("reference data must be a 2-D array (rows x features)")
    if reference.shape[0] < 8:
        raise FleetInputError("quantization needs at least 8 reference rows (calibration + hold-out)")
    order = rng.permutation(reference.shape[0])
    n_hold = max(1, round(reference.shape[0] * gate.holdout_fraction))
    hold = reference[np.sort(order[:n_hold])].astype(spec.dtype)
    calib = reference[np.sort(order[n_hold:][: gate.max_calibration_rows])].astype(spec.dtype)
    return calib, hold


def _reader(input_name: str, rows: np.ndarray) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Rows(CalibrationDataReader):
        """Feeds calibration rows in small batches (MinMax calibration)."""

        def __init__(self) -> None:
            self._batches = iter([rows[i : i + _BATCH] for i in range(0, rows.shape[0], _BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    return _Rows()


def output_op(model: bytes, output_name: str) -> str | None:
    """The op type producing `output_name` in the float graph (through Identity nodes), if any."""
    import onnx  # heavy, needed by quantization only

    try:
        graph = onnx.load_from_string(model).graph
    except Exception:  # onnx raises several types for bytes it cannot parse; the quantizer reports those
        return None
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(output_name)
    while node is not None and node.op_type == "Identity" and node.input:
        node = producers.get(node.input[0])
    return None if node is None else str(node.op_type)


def quantize_onnx(
    model: bytes,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    mode: QuantizeMode,
    gate: QuantizationGate,
    seed: int,
    reference: np.ndarray | None,
) -> tuple[bytes, Quantization]:
    """Quantize to int8 (`mode` = dynamic|static) and gate it against the float model.

    `seed` fixes the calibration/hold-out split (and the synthetic hold-out rows without
    reference data), so the same inputs give the same bundle.

    Raises `FleetInputError` (multi-input model, missing/too little calibration data,
    quantizer failure) or `GateFailed` (figures: label_agreement, max/mean abs delta).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(inputs) != 1 or inputs[0].dtype != "float32":
        raise FleetInputError("int8 quantization supports single float32-input models")
    calib, hold = _split(reference, inputs[0], mode, gate, seed)
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        src, pre, dst = Path(tmp) / "float.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=True)
            if mode == "dynamic":
                quantize_dynamic(pre, dst, weight_type=QuantType.QInt8)
            else:
                assert calib is not None  # _split refuses static without reference data
                quantize_static(
                    pre,
                    dst,
                    _reader(inputs[0].name, calib),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                )
        except Exception as exc:  # the quantizer raises many types for models it cannot handle
            raise FleetInputError(f"onnxruntime quantization failed: {exc}") from None
        quantized = dst.read_bytes()
    feeds = {inputs[0].name: hold}
    float_out = run_model(model, "onnx", feeds)[outputs[0].name]
    kind = resolve_kind(gate.output_kind, output_op(model, outputs[0].name), float_out)
    verdict = judge(gate, kind, float_out, run_model(quantized, "onnx", feeds)[outputs[0].name],
                    len(model), len(quantized))
    figures = verdict.figures
    log_event(log, "bundle.quantized", logging.INFO, mode=mode, kind=kind, passed=not verdict.problems,
              **figures)
    for warning in verdict.warnings:
        log_event(log, "bundle.quantization_warning", logging.WARNING, mode=mode, warning=warning)
    if verdict.problems:
        raise GateFailed(f"int8 model refused ({kind} output): " + "; ".join(verdict.problems), figures)
    agreement = figures.get("label_agreement")
    return quantized, Quantization(
        scheme="int8-dynamic" if mode == "dynamic" else "int8-static",
        calibration={
            "method": "none" if mode == "dynamic" else "minmax",
            "calibration_rows": 0 if calib is None or mode == "dynamic" else int(calib.shape[0]),
            "holdout_rows": int(hold.shape[0]),
            "holdout": "synthetic-normal" if reference is None else "reference-holdout",
            "output_kind": kind,
            "limits": verdict.limits,
            "warnings": verdict.warnings,
            **{k: v for k, v in figures.items() if k != "rows"},
        },
        accuracy_delta=None if agreement is None else 1.0 - agreement,
        agreement=agreement,
    )


__all__ = ["QuantizationGate", "QuantizeMode", "output_op", "quantize_onnx"]
