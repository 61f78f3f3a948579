"""Accuracy estimated without labels (CBPE) and realised from folded labels, vs exact.

A 3-class problem whose true p(y | x) is a softmax of a linear map of 4 normal features; the
model has the right decision boundaries but is over-confident (its logits are 1.8 x the true
ones), so its raw confidence is miscalibrated and the bundle's calibration map matters. The
map is fitted on 20,000 unshifted holdout rows by the bundle pipeline's code
(`fleet.registry.calibration.performance_spec`). Windows are then drawn under covariate shift
(the feature mean moves by 0.5, 1.0 and 2.0 standard deviations along a fixed direction; p(y|x)
does not change), 2,000 and 10,000 rows each, 40 windows per cell, and every window goes the
real way: agent sketch (`TelemetrySketch.update` with the model's outputs) -> prediction log ->
labels matched and folded -> report encoded and decoded -> fleet `summarize`.

Metrics, vs the exact accuracy of the window's predictions against its labels:
- `accuracy_estimate_abs_err_mean` / `_max`: the label-free estimate (goal mean <= 0.01);
- `accuracy_estimate_band_coverage`: share of windows whose realised accuracy lies in the band;
- baselines measured in the same run: `raw_confidence_abs_err_mean` (mean uncalibrated top-class
  confidence) and `holdout_accuracy_abs_err_mean` (assume the holdout accuracy holds);
- `feedback_accuracy_abs_err_max`: realised accuracy from the folded confusion matrix (goal 0).
"""

from __future__ import annotations

import numpy as np

from agent.contract.performance import top_confidence
from agent.contract.telemetry_codec import decode_report, encode_report
from agent.telemetry import TelemetrySketch
from agent.telemetry.feedback import FeedbackConfig, PredictionLog
from fleet.registry.calibration import performance_spec
from fleet.registry.profile import compute_reference_profile
from fleet.telemetry.performance import summarize

NAME = "accuracy_estimate"
DESCRIPTION = "CBPE accuracy estimate and folded-label accuracy vs exact (3 shifts x 2 window sizes)"

FEATURES, CLASSES, OVERCONFIDENCE = 4, 3, 1.8
SHIFTS = (0.5, 1.0, 2.0)
WINDOWS = (2_000, 10_000)
PER_CELL = 40


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def run() -> dict[str, float]:
    rng = np.random.default_rng(13)
    w = rng.normal(0.0, 1.0, (FEATURES, CLASSES))
    direction = rng.normal(0.0, 1.0, FEATURES)
    direction /= np.linalg.norm(direction)

    def draw(n: int, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = rng.normal(0.0, 1.0, (n, FEATURES)) + shift * direction
        true_p = _softmax(x @ w)
        y = (rng.random(n)[:, None] > np.cumsum(true_p, axis=1)).sum(axis=1)
        return x, _softmax(OVERCONFIDENCE * (x @ w)), y

    hx, hout, hy = draw(20_000, 0.0)
    spec = performance_spec(hout, hy)
    profile = compute_reference_profile(hx, [f"f{i}" for i in range(FEATURES)], outputs=hout)
    profile = profile.model_copy(update={"performance": spec})
    holdout_acc = float(np.mean(hout.argmax(axis=1) == hy))
    est_err: list[float] = []
    raw_err: list[float] = []
    hold_err: list[float] = []
    fb_err: list[float] = []
    covered = 0
    out: dict[str, float] = {}
    for shift in SHIFTS:
        for n in WINDOWS:
            cell: list[float] = []
            for _ in range(PER_CELL):
                x, probs, y = draw(n, shift)
                exact = float(np.mean(probs.argmax(axis=1) == y))
                sk = TelemetrySketch(profile, "d", "m", "1.0.0", resource_probe=lambda: (0, 0.0, 0.0))
                log = PredictionLog(FeedbackConfig(capacity=n, max_batch=n))
                for i in range(0, n, 500):  # served in requests of 500 rows
                    sk.update(x[i : i + 500], probs[i : i + 500], 0.001)
                ids = log.record("m-1.0.0", sk.performance.predicted(probs))
                matched = log.match(list(zip(ids, y.tolist(), strict=True))).pairs["m-1.0.0"]
                sk.fold_labels(np.asarray(matched.predicted), np.asarray(matched.labels))
                rep = decode_report(encode_report(sk.snapshot_and_reset()))
                s = summarize(rep.performance, profile)
                assert s is not None and s.estimated_accuracy is not None and s.accuracy is not None
                assert s.estimate_low is not None and s.estimate_high is not None
                cell.append(abs(s.estimated_accuracy - exact))
                covered += int(s.estimate_low <= exact <= s.estimate_high)
                raw_err.append(abs(float(top_confidence(probs)[1].mean()) - exact))
                hold_err.append(abs(holdout_acc - exact))
                fb_err.append(abs(s.accuracy - exact))
            out[f"accuracy_estimate_abs_err_mean_shift{shift}_n{n}"] = float(np.mean(cell))
            est_err.extend(cell)
    return {
        "accuracy_estimate_abs_err_mean": float(np.mean(est_err)),
        "accuracy_estimate_abs_err_max": float(np.max(est_err)),
        "accuracy_estimate_band_coverage": covered / len(est_err),
        "raw_confidence_abs_err_mean": float(np.mean(raw_err)),
        "holdout_accuracy_abs_err_mean": float(np.mean(hold_err)),
        "feedback_accuracy_abs_err_max": float(np.max(fb_err)),
        **out,
    }
