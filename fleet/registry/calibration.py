"""Fit the calibration map a bundle ships: raw top-class confidence -> probability of being right.

Why histogram binning made monotone (isotonic over equal-mass bins) and interpolated, with
numpy only: it needs no model of the score's shape (Platt scaling assumes a sigmoid), it
never reverses the model's ranking, and linear interpolation between bin centres removes
most of the within-bin bias plain binning has when traffic shifts inside a bin (what
covariate shift does). The fleet then estimates a window's accuracy as the mean calibrated
confidence (confidence-based performance estimation, CBPE).

`bin_se` is the standard error of the holdout accuracy among rows whose calibrated
confidence falls in each fixed bin; the fleet folds it into the estimate's error band.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from agent.contract.manifest import CONFIDENCE_BINS, Calibration, PerformanceSpec
from agent.contract.performance import calibrate, confidence_bins, top_confidence
from fleet.errors import FleetInputError

DEFAULT_BINS = 20
MIN_HOLDOUT_ROWS = 50


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted non-decreasing least-squares fit of `y` (pool adjacent violators). Pure."""
    vals: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for v, wt in zip(y.tolist(), w.tolist(), strict=True):
        vals.append(v)
        weights.append(wt)
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, s2 = vals.pop(), weights.pop(), sizes.pop()
            total = weights[-1] + w2
            vals[-1] = (vals[-1] * weights[-1] + v2 * w2) / total if total else v2
            weights[-1] = total
            sizes[-1] += s2
    return np.repeat(np.array(vals), sizes)


def fit_calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> Calibration:
    """Fit the map on holdout rows: `confidence` the raw top-class score, `correct` whether the
    top class was the label. Raises `FleetInputError` for fewer than MIN_HOLDOUT_ROWS rows."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=np.float64).ravel()
    if conf.size < MIN_HOLDOUT_ROWS or conf.size != ok.size:
        raise FleetInputError(f"calibration needs at least {MIN_HOLDOUT_ROWS} labelled holdout rows")
    order = np.argsort(conf, kind="stable")
    conf, ok = conf[order], ok[order]
    parts = [p for p in np.array_split(np.arange(conf.size), max(1, min(bins, conf.size // 10))) if p.size]
    x = np.array([conf[p].mean() for p in parts])
    n = np.array([p.size for p in parts], dtype=np.float64)
    y = isotonic(np.array([ok[p].mean() for p in parts]), n)
    x = np.maximum.accumulate(np.clip(x, 0.0, 1.0))
    cal = calibrate(conf, _map(x, y, np.full(CONFIDENCE_BINS, 0.5), conf.size, float(ok.mean())))
    idx = np.clip((cal * CONFIDENCE_BINS).astype(np.intp), 0, CONFIDENCE_BINS - 1)
    m = confidence_bins(cal).astype(np.float64)
    hits = np.bincount(idx, weights=ok, minlength=CONFIDENCE_BINS)
    p = np.divide(hits, m, out=np.full(CONFIDENCE_BINS, 0.5), where=m > 0)
    # An empty bin says nothing: the worst binomial error (0.5) until data shows otherwise.
    mm = np.maximum(m, 1)
    se = np.where(m > 0, np.sqrt((p * (1 - p) + 0.25 / mm) / mm), 0.5)  # never 0 at p = 0 or 1
    return _map(x, y, se, conf.size, float(ok.mean()))


def _map(x: np.ndarray, y: np.ndarray, se: np.ndarray, rows: int, accuracy: float) -> Calibration:
    return Calibration(
        knots_x=[float(v) for v in x], knots_y=[float(min(max(v, 0.0), 1.0)) for v in y],
        bin_se=[float(min(v, 1.0)) for v in se], holdout_rows=rows, holdout_accuracy=accuracy,
    )


def performance_spec(outputs: np.ndarray, labels: np.ndarray | None, bins: int = DEFAULT_BINS
                     ) -> PerformanceSpec:
    """The bundle's `PerformanceSpec` from the model's outputs on the holdout rows and their
    labels: a classifier (more than one output column) gets a calibration map when labels
    are given; its scores are taken as probabilities when every row is in [0, 1] and sums to 1,
    else as logits. Raises `FleetInputError` on labels that do not fit the outputs."""
    out = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    if out.shape[1] < 2:
        return PerformanceSpec(task="regression")
    k = out.shape[1]
    probs = bool(np.all((out >= 0) & (out <= 1)) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))
    scores: Literal["probabilities", "logits"] = "probabilities" if probs else "logits"
    if labels is None:
        return PerformanceSpec(task="classification", classes=k, scores=scores)
    lab = np.asarray(labels).ravel()
    if lab.size != out.shape[0]:
        raise FleetInputError(f"{lab.size} holdout labels for {out.shape[0]} holdout rows")
    if (not np.issubdtype(lab.dtype, np.number) or np.any(lab != np.round(lab))
            or lab.min() < 0 or lab.max() >= k):
        raise FleetInputError(f"holdout labels must be class indices 0..{k - 1}")
    pred, conf = top_confidence(out, scores)
    calibration = fit_calibration(conf, pred == lab, bins)
    return PerformanceSpec(task="classification", classes=k, scores=scores, calibration=calibration)
