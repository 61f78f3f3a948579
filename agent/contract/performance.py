"""Model performance in a telemetry report: labels matched to predictions, and confidence.

Why in the report and not a stream of labelled rows: the fleet only ever needs sums. A
classifier's matched (label, prediction) pairs fold into a confusion matrix (rows = true
class, columns = predicted class), a regressor's into a log-bucket histogram of absolute
errors plus exact error sums (MAE, RMSE and bias are exact); the calibrated top-class
confidence of every served prediction folds into a fixed 20-bin histogram plus its exact
sum and sum of squares, from which the fleet estimates accuracy without labels (CBPE).
Everything adds, so reports and windows merge by summing, like the rest of the report.

Pure: no I/O, no clock. Imported by the agent (folding) and the fleet (checks, estimates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent.contract.manifest import CONFIDENCE_BINS, Calibration, ReferenceProfile
from agent.errors import MessageError

MAX_CLASSES = 256
# |error| buckets: 0 is < ERROR_MIN, bucket i (1..N-2) is [MIN·2^((i-1)/2), MIN·2^(i/2)), the
# last is everything above (~1e6): errors of any scale keep ~41 % relative resolution.
ERROR_MIN = 1e-6
ERROR_BUCKETS_PER_OCTAVE = 2
ERROR_BUCKETS = 2 + 40 * ERROR_BUCKETS_PER_OCTAVE
# Feedback outcomes counted per interval, in this order on the wire.
FEEDBACK_OUTCOMES = ("matched", "unknown", "expired", "duplicate", "invalid")

Task = Literal["classification", "regression"]


@dataclass
class PerformanceSketch:
    """Labels and confidence of one interval of one model version (see module docstring).

    A classifier has a (k, k) `confusion` and empty `error_counts`; a regressor the reverse.
    `confidence_counts` is empty when the bundle ships no calibration map.
    """

    task: Task
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    error_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    error_sum: float = 0.0
    error_abs_sum: float = 0.0
    error_sq_sum: float = 0.0
    confidence_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    confidence_sum: float = 0.0
    confidence_sq_sum: float = 0.0
    feedback: np.ndarray = field(default_factory=lambda: np.zeros(len(FEEDBACK_OUTCOMES), np.int64))

    @property
    def labelled(self) -> int:
        """Matched (label, prediction) pairs folded."""
        return int(self.confusion.sum()) if self.task == "classification" else int(self.error_counts.sum())

    @property
    def confidence_rows(self) -> int:
        return int(self.confidence_counts.sum())


def task_of(profile: ReferenceProfile) -> tuple[Task, int]:
    """(task, classes) of a bundle: its `performance` spec, else inferred from the output
    profile (several output columns: a classifier over them; one: a regressor)."""
    spec = profile.performance
    if spec is not None:
        return spec.task, spec.classes
    k = len(profile.outputs)
    return ("classification", k) if k >= 2 else ("regression", 0)


def empty_sketch(profile: ReferenceProfile) -> PerformanceSketch:
    """A zero sketch shaped for `profile` (what the agent starts each interval with)."""
    task, k = task_of(profile)
    spec = profile.performance
    calibrated = spec is not None and spec.calibration is not None
    return PerformanceSketch(
        task,
        confusion=np.zeros((k, k) if task == "classification" else (0, 0), np.int64),
        error_counts=np.zeros(ERROR_BUCKETS if task == "regression" else 0, np.int64),
        confidence_counts=np.zeros(CONFIDENCE_BINS if calibrated else 0, np.int64),
    )


def error_buckets(abs_err: np.ndarray) -> np.ndarray:
    """Bucket index of each absolute error (NaN goes to bucket 0; callers drop non-finite)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        i = 1 + np.floor(np.log2(np.maximum(abs_err, ERROR_MIN) / ERROR_MIN) * ERROR_BUCKETS_PER_OCTAVE)
    i = np.where(abs_err < ERROR_MIN, 0, i)
    return np.clip(np.nan_to_num(i), 0, ERROR_BUCKETS - 1).astype(np.intp)


def error_bucket_upper(i: int) -> float:
    """Upper bound of |error| bucket `i` (inf for the last)."""
    return math.inf if i >= ERROR_BUCKETS - 1 else ERROR_MIN * 2.0 ** (i / ERROR_BUCKETS_PER_OCTAVE)


def top_confidence(scores: np.ndarray, kind: str = "probabilities") -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, its score as a probability) per row of a (n, k) score matrix;
    logits are softmaxed first."""
    s = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    pred = np.argmax(s, axis=1)
    if kind == "logits":
        z = s - s.max(axis=1, keepdims=True)
        e = np.exp(z)
        conf = 1.0 / e.sum(axis=1)  # exp(0) of the top class over the sum
    else:
        conf = s[np.arange(len(s)), pred]
    return pred, np.clip(np.nan_to_num(conf, nan=0.0), 0.0, 1.0)


def calibrate(conf: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Calibrated confidence: linear between the knots, flat beyond them."""
    return np.interp(conf, calibration.knots_x, calibration.knots_y)


def confidence_bins(calibrated: np.ndarray) -> np.ndarray:
    """Counts of calibrated confidences over the CONFIDENCE_BINS equal-width bins of [0, 1]."""
    idx = np.clip((np.asarray(calibrated) * CONFIDENCE_BINS).astype(np.intp), 0, CONFIDENCE_BINS - 1)
    return np.bincount(idx, minlength=CONFIDENCE_BINS).astype(np.int64)


# ------------------------------------------------------------------------------- merging
def _check_same(a: PerformanceSketch, b: PerformanceSketch) -> None:
    if (a.task != b.task or a.confusion.shape != b.confusion.shape
            or a.error_counts.shape != b.error_counts.shape
            or a.confidence_counts.shape != b.confidence_counts.shape):
        raise MessageError("cannot merge performance sketches of different shapes")


def merge_performance_into(acc: PerformanceSketch, b: PerformanceSketch) -> None:
    """Add `b` into `acc` in place. Raises `MessageError` (acc unchanged) on a shape mismatch."""
    _check_same(acc, b)
    acc.confusion = acc.confusion + b.confusion
    acc.error_counts = acc.error_counts + b.error_counts
    acc.error_sum += b.error_sum
    acc.error_abs_sum += b.error_abs_sum
    acc.error_sq_sum += b.error_sq_sum
    acc.confidence_counts = acc.confidence_counts + b.confidence_counts
    acc.confidence_sum += b.confidence_sum
    acc.confidence_sq_sum += b.confidence_sq_sum
    acc.feedback = acc.feedback + b.feedback


def copy_performance(p: PerformanceSketch) -> PerformanceSketch:
    return PerformanceSketch(
        p.task, p.confusion.astype(np.int64), p.error_counts.astype(np.int64), p.error_sum,
        p.error_abs_sum, p.error_sq_sum, p.confidence_counts.astype(np.int64), p.confidence_sum,
        p.confidence_sq_sum, p.feedback.astype(np.int64),
    )


# ------------------------------------------------------------------------------ encoding
_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _pack(counts: np.ndarray) -> list[Any]:
    flat = np.asarray(counts, dtype=np.int64).ravel()
    top = int(flat.max()) if flat.size else 0
    width = 1 if top < 2**8 else 2 if top < 2**16 else 4 if top < 2**32 else 8
    return [width, flat.astype(_DTYPES[width]).tobytes()]


def _unpack(v: Any, what: str, n: int) -> np.ndarray:
    if not isinstance(v, list) or len(v) != 2:
        raise MessageError(f"performance {what}: bad packed integers")
    width, blob = v
    if type(width) is not int or width not in _DTYPES or not isinstance(blob, bytes) \
            or len(blob) != n * width:
        raise MessageError(f"performance {what}: expected {n} packed integers")
    return np.frombuffer(blob, dtype=_DTYPES[width]).astype(np.int64)


def _floats(v: Any, what: str, n: int) -> list[float]:
    if not isinstance(v, list) or len(v) != n or any(type(x) not in (int, float) or not math.isfinite(x)
                                                      for x in v):
        raise MessageError(f"performance {what}: expected {n} finite numbers")
    return [float(x) for x in v]


def encode_performance(p: PerformanceSketch) -> list[Any]:
    """The report's body field 24: `[task (0 classifier / 1 regressor), classes,
    confusion, error counts, [error sum, |error| sum, error² sum], confidence bins,
    [confidence sum, confidence² sum], feedback outcomes]`, counts packed like the report's."""
    k = p.confusion.shape[0] if p.task == "classification" else 0
    return [
        0 if p.task == "classification" else 1, k, _pack(p.confusion), _pack(p.error_counts),
        [p.error_sum, p.error_abs_sum, p.error_sq_sum], _pack(p.confidence_counts),
        [p.confidence_sum, p.confidence_sq_sum], _pack(p.feedback),
    ]


def decode_performance(v: Any) -> PerformanceSketch:
    """Decode and bound body field 24. Raises `MessageError` on anything malformed: an
    unknown task, more than MAX_CLASSES classes, a confusion matrix that is not k x k, a
    regressor with a confusion matrix (or a classifier with an error histogram), a confidence
    histogram of another size, non-finite sums."""
    if not isinstance(v, list) or len(v) != 8:
        raise MessageError("performance: expected a list of 8 fields")
    task_code, k = v[0], v[1]
    if task_code not in (0, 1) or type(task_code) is not int or type(k) is not int:
        raise MessageError("performance: unknown task")
    if task_code == 0 and not 2 <= k <= MAX_CLASSES:
        raise MessageError(f"performance: a classifier needs 2..{MAX_CLASSES} classes")
    if task_code == 1 and k != 0:
        raise MessageError("performance: a regressor has no classes")
    conf_len = len(v[5][1]) // v[5][0] if isinstance(v[5], list) and len(v[5]) == 2 and v[5][0] in _DTYPES \
        and isinstance(v[5][1], bytes) else -1
    if conf_len not in (0, CONFIDENCE_BINS):
        raise MessageError(f"performance: confidence histogram must have 0 or {CONFIDENCE_BINS} bins")
    errs = _floats(v[4], "error sums", 3)
    confs = _floats(v[6], "confidence sums", 2)
    return PerformanceSketch(
        "classification" if task_code == 0 else "regression",
        confusion=_unpack(v[2], "confusion", k * k).reshape(k, k),
        error_counts=_unpack(v[3], "errors", ERROR_BUCKETS if task_code == 1 else 0),
        error_sum=errs[0], error_abs_sum=errs[1], error_sq_sum=errs[2],
        confidence_counts=_unpack(v[5], "confidence", conf_len),
        confidence_sum=confs[0], confidence_sq_sum=confs[1],
        feedback=_unpack(v[7], "feedback", len(FEEDBACK_OUTCOMES)),
    )


def check_performance_shape(p: PerformanceSketch, profile: ReferenceProfile) -> None:
    """Refuse a sketch whose task or confusion size is not the model version's.
    Raises `MessageError`."""
    task, k = task_of(profile)
    if p.task != task:
        raise MessageError(f"performance: report says {p.task}, the model version is a {task} model")
    if task == "classification" and p.confusion.shape != (k, k):
        raise MessageError(f"performance: confusion matrix is {p.confusion.shape[0]}x{p.confusion.shape[1]}, "
                           f"the model has {k} classes")
    calibrated = profile.performance is not None and profile.performance.calibration is not None
    if p.confidence_counts.size and not calibrated:
        raise MessageError("performance: confidence histogram for a model without calibration")
