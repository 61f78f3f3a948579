"""The int8 validation gate: how far a quantized model may stray from its float original.

Pure decisions over the two models' outputs on held-out rows (no I/O): `fleet.registry.quantize`
runs the models and calls `judge`. One absolute bound cannot fit every model (a delta of 1.0
lets a probability move from 0.9 to 0.155), so the limits follow what the output *is*:

- `probabilities` (a Softmax/Sigmoid output, or rows in [0, 1] summing to 1): the values
  themselves. In 99% of the rows no probability moves by more than 0.05, in no row by more
  than 0.25, by 0.01 on average; top-1 agreement >= 0.97;
- `logits` (>= 2 columns, not probabilities): the softmax of both, with the same limits, since
  what scores mean to a user is the class probabilities and the top-1 label;
- `regression` (one column, not a probability): the values in units of the float output's std
  on the hold-out rows: p99 delta 0.25 std, max 1 std, mean 0.05 std.

Why a p99 beside the max: static int8 on a healthy model can move one near-tie row of a
thousand by 0.1 while every other row moves by less than 0.01; a bound on the max alone must
then be loose enough to let a systematic 0.2 distortion through. The max bound stays to refuse
any single absurd row (the 0.745 change of a probability that a flat 1.0 bound let pass).

`output_kind: auto` (the default) decides from the graph (the op producing the output) and the
float outputs; metadata can name the kind. Explicit `max_abs_delta` / `max_mean_abs_delta` are
bounds in the output's own units, checked in addition for every kind.

Size matters too: quantize-dequantize nodes cost bytes, and on a tiny model the "int8" file can
be several times the float one. An int8 model that is not smaller is recorded with a warning;
one that is larger is refused unless `allow_larger` says to keep it anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

OutputKind = Literal["auto", "probabilities", "logits", "regression"]
ResolvedKind = Literal["probabilities", "logits", "regression"]
PROBABILITY_OPS = frozenset({"Softmax", "Sigmoid"})
_SUM_TOLERANCE = 1e-3


class QuantizationGate(BaseModel):
    """How far an int8 model may stray from the float one on held-out data before the build fails."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_kind: OutputKind = "auto"
    min_label_agreement: float = Field(default=0.97, ge=0.0, le=1.0)
    p99_prob_delta: float = Field(default=0.05, gt=0, le=1.0, description="probabilities, softmax(logits)")
    max_prob_delta: float = Field(default=0.25, gt=0, le=1.0)
    max_mean_prob_delta: float = Field(default=0.01, gt=0, le=1.0)
    p99_abs_delta_std: float = Field(default=0.25, gt=0, description="regression, x the float output's std")
    max_abs_delta_std: float = Field(default=1.0, gt=0)
    max_mean_abs_delta_std: float = Field(default=0.05, gt=0)
    max_abs_delta: float | None = Field(default=None, gt=0, description="output units, any kind")
    max_mean_abs_delta: float | None = Field(default=None, gt=0)
    allow_larger: bool = Field(default=False, description="keep an int8 model larger than the float one")
    holdout_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    max_calibration_rows: int = Field(default=512, ge=1)


@dataclass(frozen=True)
class Verdict:
    """The gate's figures (recorded in the manifest either way), problems (refuse) and warnings."""

    kind: ResolvedKind
    figures: dict[str, float]
    limits: dict[str, float]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _rows(out: np.ndarray) -> np.ndarray:
    return out.reshape(out.shape[0], -1).astype(np.float64)


def resolve_kind(requested: OutputKind, output_op: str | None, float_out: np.ndarray) -> ResolvedKind:
    """The output kind: as requested, else from the producing op, else from the float outputs."""
    if requested != "auto":
        return requested
    f = _rows(float_out)
    if output_op in PROBABILITY_OPS:
        return "probabilities"
    in_unit = bool(f.size) and float(f.min()) >= 0.0 and float(f.max()) <= 1.0
    if f.shape[1] >= 2 and in_unit and np.allclose(f.sum(axis=1), 1.0, atol=_SUM_TOLERANCE):
        return "probabilities"
    return "logits" if f.shape[1] >= 2 else "regression"


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def judge(gate: QuantizationGate, kind: ResolvedKind, float_out: np.ndarray, int8_out: np.ndarray,
          float_bytes: int, int8_bytes: int) -> Verdict:
    """Compare the outputs and sizes under `gate`'s limits for `kind`."""
    f, q = _rows(float_out), _rows(int8_out)
    delta = np.abs(f - q)
    figures = {"max_abs_delta": float(delta.max()), "mean_abs_delta": float(delta.mean()),
               "rows": float(f.shape[0]), "float_bytes": float(float_bytes), "int8_bytes": float(int8_bytes),
               "size_ratio": float(int8_bytes) / max(float(float_bytes), 1.0)}
    limits: dict[str, float] = {}
    problems: list[str] = []
    if f.shape[1] >= 2:
        figures["label_agreement"] = float(np.mean(f.argmax(axis=1) == q.argmax(axis=1)))
        limits["min_label_agreement"] = gate.min_label_agreement
        if figures["label_agreement"] < gate.min_label_agreement:
            problems.append(f"top-1 agreement {figures['label_agreement']:.4f} < {gate.min_label_agreement}")
    if kind in ("probabilities", "logits"):
        pf, pq = (f, q) if kind == "probabilities" else (_softmax(f), _softmax(q))
        row = np.abs(pf - pq).max(axis=1)  # the largest probability move of each row
        figures.update(max_prob_delta=float(row.max()), p99_prob_delta=float(np.quantile(row, 0.99)),
                       mean_prob_delta=float(np.abs(pf - pq).mean()))
        limits.update(p99_prob_delta=gate.p99_prob_delta, max_prob_delta=gate.max_prob_delta,
                      max_mean_prob_delta=gate.max_mean_prob_delta)
        what = "probability" if kind == "probabilities" else "softmax probability"
        checks = [("p99", "p99_prob_delta", gate.p99_prob_delta),
                  ("max", "max_prob_delta", gate.max_prob_delta),
                  ("mean", "mean_prob_delta", gate.max_mean_prob_delta)]
        unit = ""
    else:
        std = np.maximum(f.std(axis=0), 1e-12)
        scaled = delta / std
        figures.update(output_std=float(std.mean()), max_abs_delta_std=float(scaled.max()),
                       p99_abs_delta_std=float(np.quantile(scaled.max(axis=1), 0.99)),
                       mean_abs_delta_std=float(scaled.mean()))
        limits.update(p99_abs_delta_std=gate.p99_abs_delta_std, max_abs_delta_std=gate.max_abs_delta_std,
                      max_mean_abs_delta_std=gate.max_mean_abs_delta_std)
        what, unit = "abs", " std"
        checks = [("p99", "p99_abs_delta_std", gate.p99_abs_delta_std),
                  ("max", "max_abs_delta_std", gate.max_abs_delta_std),
                  ("mean", "mean_abs_delta_std", gate.max_mean_abs_delta_std)]
    for label, key, bound in checks:
        if figures[key] > bound:
            problems.append(f"{label} {what} delta {figures[key]:.4g}{unit} > {bound}{unit}")
    if gate.max_abs_delta is not None:
        limits["max_abs_delta"] = gate.max_abs_delta
        if figures["max_abs_delta"] > gate.max_abs_delta:
            problems.append(f"max abs delta {figures['max_abs_delta']:.4g} > {gate.max_abs_delta}")
    if gate.max_mean_abs_delta is not None:
        limits["max_mean_abs_delta"] = gate.max_mean_abs_delta
        if figures["mean_abs_delta"] > gate.max_mean_abs_delta:
            problems.append(f"mean abs delta {figures['mean_abs_delta']:.4g} > {gate.max_mean_abs_delta}")
    warnings = []
    if int8_bytes >= float_bytes:
        size = (f"the int8 model is {'larger than' if int8_bytes > float_bytes else 'as large as'} the float "
                f"one ({int8_bytes} vs {float_bytes} bytes, {figures['size_ratio']:.2f}x): quantization does "
                "not pay for this model")
        if int8_bytes > float_bytes and not gate.allow_larger:
            problems.append(size + " (build it unquantized, or keep it with --allow-larger-int8 / "
                                   "quantization_gate.allow_larger)")
        else:
            warnings.append(size)
    return Verdict(kind, figures, limits, problems, warnings)
