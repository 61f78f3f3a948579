"""Int8 quantization of ONNX models with a validation gate against the float model.

`onnxruntime.quantization` does the work (`quantize_dynamic`, or `quantize_static` with a
`CalibrationDataReader` over reference rows after `quant_pre_process(skip_symbolic_shape=True)`,
which avoids needing sympy). The gate then runs the float and the int8 model on held-out rows
the calibration never saw and refuses the build (`GateFailed`, figures attached) when label
agreement or the output deltas exceed the metadata's `QuantizationGate`.

The gate's settings live here (the builder's `BundleMetadata` holds one) and the model runner
is `fleet.registry.model_runner`, so this module never imports the builder that calls it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.contract.manifest import Quantization, TensorSpec
from agent.logs import log_event
from fleet.errors import FleetInputError, GateFailed
from fleet.registry.model_runner import run_model

log = logging.getLogger("edgefleet.fleet.quantize")
_BATCH = 32
_SYNTHETIC_ROWS = 256

QuantizeMode = Literal["none", "dynamic", "static"]


class QuantizationGate(BaseModel):
    """How far an int8 model may stray from the float one on held-out data before the build fails."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_label_agreement: float = Field(default=0.97, ge=0.0, le=1.0)
    max_abs_delta: float = Field(default=1.0, gt=0)
    max_mean_abs_delta: float = Field(default=0.1, gt=0)
    holdout_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    max_calibration_rows: int = Field(default=512, ge=1)


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


def gate_figures(float_out: np.ndarray, int8_out: np.ndarray) -> dict[str, float]:
    """Label agreement (argmax, when there are >= 2 output columns) and abs deltas."""
    f = float_out.reshape(float_out.shape[0], -1).astype(np.float64)
    q = int8_out.reshape(int8_out.shape[0], -1).astype(np.float64)
    delta = np.abs(f - q)
    figures = {
        "max_abs_delta": float(delta.max()),
        "mean_abs_delta": float(delta.mean()),
        "rows": float(f.shape[0]),
    }
    if f.shape[1] >= 2:
        figures["label_agreement"] = float(np.mean(f.argmax(axis=1) == q.argmax(axis=1)))
    return figures


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
    figures = gate_figures(
        run_model(model, "onnx", feeds)[outputs[0].name], run_model(quantized, "onnx", feeds)[outputs[0].name]
    )
    figures.update(float_bytes=float(len(model)), int8_bytes=float(len(quantized)))
    problems = []
    if figures.get("label_agreement", 1.0) < gate.min_label_agreement:
        problems.append(f"label agreement {figures['label_agreement']:.4f} < {gate.min_label_agreement}")
    if figures["max_abs_delta"] > gate.max_abs_delta:
        problems.append(f"max abs delta {figures['max_abs_delta']:.4g} > {gate.max_abs_delta}")
    if figures["mean_abs_delta"] > gate.max_mean_abs_delta:
        problems.append(f"mean abs delta {figures['mean_abs_delta']:.4g} > {gate.max_mean_abs_delta}")
    log_event(log, "bundle.quantized", logging.INFO, mode=mode, passed=not problems, **figures)
    if problems:
        raise GateFailed("int8 model too far from the float model: " + "; ".join(problems), figures)
    agreement = figures.get("label_agreement")
    return quantized, Quantization(
        scheme="int8-dynamic" if mode == "dynamic" else "int8-static",
        calibration={
            "method": "none" if mode == "dynamic" else "minmax",
            "calibration_rows": 0 if calib is None or mode == "dynamic" else int(calib.shape[0]),
            "holdout_rows": int(hold.shape[0]),
            "holdout": "synthetic-normal" if reference is None else "reference-holdout",
            **{k: v for k, v in figures.items() if k != "rows"},
        },
        accuracy_delta=None if agreement is None else 1.0 - agreement,
        agreement=agreement,
    )
