"""Model performance of merged windows: realised (from folded labels) and estimated (CBPE).

Realised figures come from the merged confusion matrix (accuracy, precision and recall per
class) or the error sums (MAE, RMSE, bias): exact for the labels that arrived.

The estimate needs no labels: each served prediction's calibrated top-class confidence c is
the probability that it is right, so a window's expected accuracy is mean(c) (NannyML's
confidence-based performance estimation, with our own calibration map). The band combines
(a) sampling: the realised accuracy of n predictions with success probabilities c_i has
variance Σ c_i(1 - c_i) / n², exact from the sketched Σc and Σc²; and (b) the calibration map's
own error, taken as independent between the 20 fixed confidence bins and fully shared inside
one: Σ_b (n_b / n)² se_b². The band is ±z·√(a + b), z = 1.96.

What it cannot see: concept drift. If p(y | x) changes (the same inputs now mean another
label), confidence does not move and the estimate stays where it was; only labels show it.

Pure functions over sketches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from agent.contract.manifest import ReferenceProfile
from agent.contract.performance import FEEDBACK_OUTCOMES, PerformanceSketch

Z_95 = 1.959964


@dataclass(frozen=True)
class ClassFigures:
    """Precision and recall of one class (None when undefined: nothing predicted / no label)."""

    label: int
    support: int
    precision: float | None
    recall: float | None


@dataclass(frozen=True)
class PerformanceSummary:
    """What the API, `/metrics` and the CLI show for one merged range of windows."""

    task: str
    labelled: int = 0
    accuracy: float | None = None
    classes: list[ClassFigures] = field(default_factory=list)
    mae: float | None = None
    rmse: float | None = None
    bias: float | None = None
    estimate_rows: int = 0
    estimated_accuracy: float | None = None
    estimate_low: float | None = None
    estimate_high: float | None = None
    feedback: dict[str, int] = field(default_factory=dict)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def realised(p: PerformanceSketch) -> tuple[float | None, list[ClassFigures]]:
    """Accuracy and per-class precision/recall from a confusion matrix (rows = true class)."""
    cm = p.confusion.astype(np.float64)
    total = cm.sum()
    if p.task != "classification" or not total:
        return None, []
    diag, rows, cols = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    figures = [ClassFigures(i, int(rows[i]), _ratio(diag[i], cols[i]), _ratio(diag[i], rows[i]))
               for i in range(cm.shape[0])]
    return float(diag.sum() / total), figures


def estimate(p: PerformanceSketch, profile: ReferenceProfile | None) -> tuple[float, float, float] | None:
    """(expected accuracy, low, high) from the confidence sketch, or None without one."""
    n = p.confidence_rows
    spec = profile.performance if profile is not None else None
    if not n or spec is None or spec.calibration is None:
        return None
    mean = p.confidence_sum / n
    sampling = max(p.confidence_sum - p.confidence_sq_sum, 0.0) / (n * n)
    share = p.confidence_counts / n
    calib = float(np.sum((share * np.asarray(spec.calibration.bin_se)) ** 2))
    half = Z_95 * math.sqrt(sampling + calib)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def summarize(p: PerformanceSketch | None, profile: ReferenceProfile | None) -> PerformanceSummary | None:
    """Everything shown about one merged sketch (None when the windows carry no performance)."""
    if p is None:
        return None
    feedback = dict(zip(FEEDBACK_OUTCOMES, (int(v) for v in p.feedback), strict=True))
    est = estimate(p, profile)
    common = {
        "labelled": p.labelled, "feedback": feedback, "estimate_rows": p.confidence_rows,
        "estimated_accuracy": est[0] if est else None, "estimate_low": est[1] if est else None,
        "estimate_high": est[2] if est else None,
    }
    if p.task == "classification":
        accuracy, classes = realised(p)
        return PerformanceSummary("classification", accuracy=accuracy, classes=classes, **common)  # type: ignore[arg-type]
    n = p.labelled
    return PerformanceSummary(
        "regression", mae=_ratio(p.error_abs_sum, n), bias=_ratio(p.error_sum, n),
        rmse=math.sqrt(p.error_sq_sum / n) if n else None, **common,  # type: ignore[arg-type]
    )
