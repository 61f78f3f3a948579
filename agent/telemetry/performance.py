"""Fold served predictions' confidence and matched labels into a `PerformanceSketch`.

One `PerformanceFolder` lives in each `TelemetrySketch` (one interval of one model version)
and is driven under that sketch's lock: `fold_outputs` with every batch of outputs the
sketch folds (only when the bundle ships a calibration map: the calibrated top-class
confidence goes into a fixed-bin histogram), `fold_labels` with matched (prediction, label)
pairs from the prediction log, `count` with feedback outcomes.
"""

from __future__ import annotations

import numpy as np

from agent.contract.manifest import ReferenceProfile
from agent.contract.performance import (
    FEEDBACK_OUTCOMES,
    PerformanceSketch,
    calibrate,
    confidence_bins,
    empty_sketch,
    error_buckets,
    task_of,
    top_confidence,
)


class PerformanceFolder:
    """Per-interval labels and confidence of one model version (not thread-safe: the owning
    sketch's lock serialises it)."""

    def __init__(self, profile: ReferenceProfile) -> None:
        self.profile = profile
        self.task, self.classes = task_of(profile)
        spec = profile.performance
        self.scores = spec.scores if spec is not None else "probabilities"
        self.calibration = spec.calibration if spec is not None else None
        self._sketch = empty_sketch(profile)
        self._touched = False

    def predicted(self, outputs: np.ndarray) -> np.ndarray:
        """What each output row predicts: the class index (classifier) or output column 0."""
        out = outputs if isinstance(outputs, np.ndarray) else np.asarray(outputs)
        if out.ndim != 2:  # on the serving path (one row a request) every call here counts
            out = out.reshape(out.shape[0], -1) if out.ndim else out.reshape(1, 1)
        if self.task == "classification":
            return out.argmax(axis=1)
        return out[:, 0]

    def accepts(self, label: float) -> bool:
        """Whether this model can use `label`: a class index 0..classes-1, or any finite number."""
        if self.task == "classification":
            return label == int(label) and 0 <= label < self.classes
        return bool(np.isfinite(label))

    def fold_outputs(self, outputs: np.ndarray) -> None:
        """Fold the calibrated top-class confidence of each row (no-op without calibration,
        or when the rows are not `classes` wide)."""
        if self.calibration is None or outputs.ndim != 2 or outputs.shape[1] != self.classes:
            return
        _, conf = top_confidence(outputs, self.scores)
        c = calibrate(conf, self.calibration)
        s = self._sketch
        s.confidence_counts += confidence_bins(c)
        s.confidence_sum += float(c.sum())
        s.confidence_sq_sum += float(np.dot(c, c))
        self._touched = True

    def fold_labels(self, predicted: np.ndarray, labels: np.ndarray) -> int:
        """Fold matched pairs; returns how many were invalid for this model (a class label that
        is not an integer in 0..classes-1, a non-finite regression label) and skipped."""
        pred = np.asarray(predicted, dtype=np.float64)
        lab = np.asarray(labels, dtype=np.float64)
        s = self._sketch
        self._touched = True
        if self.task == "classification":
            ok = np.isfinite(lab) & (lab == np.round(lab)) & (lab >= 0) & (lab < self.classes)
            k = self.classes
            idx = lab[ok].astype(np.intp) * k + pred[ok].astype(np.intp)
            s.confusion += np.bincount(idx, minlength=k * k).reshape(k, k)
        else:
            ok = np.isfinite(lab) & np.isfinite(pred)
            err = pred[ok] - lab[ok]
            s.error_counts += np.bincount(error_buckets(np.abs(err)), minlength=s.error_counts.size)
            s.error_sum += float(err.sum())
            s.error_abs_sum += float(np.abs(err).sum())
            s.error_sq_sum += float(np.dot(err, err))
        invalid = int((~ok).sum())
        s.feedback[FEEDBACK_OUTCOMES.index("matched")] += int(ok.sum())
        s.feedback[FEEDBACK_OUTCOMES.index("invalid")] += invalid
        return invalid

    def count(self, outcome: str, n: int = 1) -> None:
        """Count feedback items that matched nothing (unknown, expired, duplicate, invalid)."""
        if n:
            self._sketch.feedback[FEEDBACK_OUTCOMES.index(outcome)] += n
            self._touched = True

    def snapshot_and_reset(self) -> PerformanceSketch | None:
        """The interval's sketch, or None when nothing was folded (the report then carries no
        performance field at all, byte for byte what older agents sent)."""
        if not self._touched:
            return None
        out, self._sketch, self._touched = self._sketch, empty_sketch(self.profile), False
        return out
