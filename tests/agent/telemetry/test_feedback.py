"""Prediction log, label folding and the report's performance field (pure parts)."""

from __future__ import annotations

import cbor2
import numpy as np
import pytest

from agent.contract.manifest import (
    CONFIDENCE_BINS,
    Calibration,
    FeatureProfile,
    PerformanceSpec,
    ReferenceProfile,
)
from agent.contract.performance import (
    ERROR_BUCKETS,
    FEEDBACK_OUTCOMES,
    MAX_CLASSES,
    check_performance_shape,
    decode_performance,
    encode_performance,
    error_bucket_upper,
    error_buckets,
    task_of,
    top_confidence,
)
from agent.contract.telemetry import merge_reports, profile_digest
from agent.contract.telemetry_codec import decode_report, encode_report
from agent.errors import MessageError, MisuseError
from agent.telemetry.feedback import FeedbackConfig, PredictionLog
from agent.telemetry.sketch import TelemetrySketch
from tests.support.fakes import FakeClock

pytestmark = pytest.mark.unit

CAL = Calibration(knots_x=[0.3, 0.6, 0.9], knots_y=[0.2, 0.5, 0.95], bin_se=[0.02] * CONFIDENCE_BINS,
                  holdout_rows=1000, holdout_accuracy=0.8)


def _profile(outputs: int = 3, spec: PerformanceSpec | None = None) -> ReferenceProfile:
    num = {"kind": "numeric", "edges": [-1.0, 0.0, 1.0]}
    return ReferenceProfile(
        features=[FeatureProfile(name=f"f{i}", **num) for i in range(2)],  # type: ignore[arg-type]
        outputs=[FeatureProfile(name=f"o{i}", **num) for i in range(outputs)],  # type: ignore[arg-type]
        performance=spec,
    )


def _sketch(profile: ReferenceProfile) -> TelemetrySketch:
    return TelemetrySketch(profile, "dev", "m", "1.0.0", resource_probe=lambda: (0, 0.0, 0.0))


# -- the prediction log -------------------------------------------------------------------------
def test_ids_match_once_and_every_other_outcome_is_counted() -> None:
    log = PredictionLog(FeedbackConfig(capacity=8), epoch="abcd0123")
    ids = log.record("m-1", np.array([2.0, 0.0, 1.0]))
    assert ids == ["abcd0123-0", "abcd0123-1", "abcd0123-2"]
    out = log.match([(ids[0], 2), (ids[1], 1), (ids[0], 2), ("abcd0123-99", 0), ("other-1", 0),
                     (17, 1), ("abcd0123-x", 1), (ids[2], "cat"), (ids[2], True)])
    assert out.counts() == {"matched": 2, "unknown": 4, "expired": 0, "duplicate": 1, "invalid": 2}
    assert out.pairs["m-1"].predicted == [2.0, 0.0] and out.pairs["m-1"].labels == [2.0, 1.0]
    # the invalid label did not consume the row: a good label still matches it
    assert log.match([(ids[2], 1.0)]).matched == 1


def test_labels_after_the_horizon_or_overwritten_rows_expire() -> None:
    clock = FakeClock()
    log = PredictionLog(FeedbackConfig(capacity=4, horizon_s=60), clock=clock)
    old = log.record("m-1", np.zeros(2))
    clock.advance(61)
    fresh = log.record("m-1", np.zeros(1))
    assert log.match([(old[0], 0)]).expired == 1
    assert log.match([(fresh[0], 0)]).matched == 1
    newer = log.record("m-1", np.zeros(4))  # overwrites every earlier slot
    out = log.match([(old[1], 0), (fresh[0], 0), (newer[0], 1)])
    assert (out.expired, out.matched) == (2, 1)


def test_a_batch_over_the_limit_is_refused_not_truncated() -> None:
    log = PredictionLog(FeedbackConfig(max_batch=3))
    ids = log.record("m-1", np.zeros(4))
    with pytest.raises(MisuseError, match="limit is 3"):
        log.match([(i, 0) for i in ids])
    assert log.match([(i, 0) for i in ids[:3]]).matched == 3  # nothing was consumed


def test_memory_is_fixed_by_capacity() -> None:
    log = PredictionLog(FeedbackConfig(capacity=16))
    for _ in range(100):
        ids = log.record("m-1", np.zeros(7))
    assert log._t.size == 16 and log.match([(ids[-1], 0)]).matched == 1


# -- folding ------------------------------------------------------------------------------------
def test_confusion_matrix_and_confidence_fold_and_survive_the_wire() -> None:
    profile = _profile(3, PerformanceSpec(task="classification", classes=3, calibration=CAL))
    sk = _sketch(profile)
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.45, 0.1, 0.45]])
    sk.update(np.zeros((4, 2)), probs, 0.001)
    pred = sk.performance.predicted(probs)
    assert pred.tolist() == [0, 1, 2, 0]
    assert sk.fold_labels(pred, np.array([0, 2, 2, 7])) == 1  # class 7 does not exist
    sk.count_feedback("unknown", 3)
    rep = decode_report(encode_report(sk.snapshot_and_reset()))
    p = rep.performance
    assert p is not None and p.task == "classification"
    assert p.confusion.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert dict(zip(FEEDBACK_OUTCOMES, p.feedback.tolist(), strict=True)) == {
        "matched": 3, "unknown": 3, "expired": 0, "duplicate": 0, "invalid": 1}
    calibrated = np.interp([0.8, 0.7, 0.6, 0.45], CAL.knots_x, CAL.knots_y)
    assert p.confidence_counts.sum() == 4
    assert p.confidence_sum == pytest.approx(calibrated.sum())
    assert p.confidence_sq_sum == pytest.approx(float(np.dot(calibrated, calibrated)))
    # the next interval starts empty and carries no performance field at all
    assert sk.snapshot_and_reset().performance is None


def test_regression_errors_fold_exactly() -> None:
    sk = _sketch(_profile(1))
    assert task_of(_profile(1)) == ("regression", 0)
    sk.fold_labels(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.0, np.nan]))
    p = sk.snapshot_and_reset().performance
    assert p is not None and p.labelled == 2 and p.error_counts.size == ERROR_BUCKETS
    assert (p.error_sum, p.error_abs_sum, p.error_sq_sum) == (-0.5, 0.5, 0.25)
    assert p.feedback[FEEDBACK_OUTCOMES.index("invalid")] == 1
    i = int(error_buckets(np.array([0.5]))[0])
    assert error_bucket_upper(i - 1) <= 0.5 < error_bucket_upper(i)


def test_logits_are_softmaxed_for_confidence() -> None:
    pred, conf = top_confidence(np.array([[0.0, np.log(3.0)]]), "logits")
    assert pred.tolist() == [1] and conf[0] == pytest.approx(0.75)


def test_merging_sums_and_reports_without_the_field_count_as_zero() -> None:
    profile = _profile(3)
    a, b, old = _sketch(profile), _sketch(profile), _sketch(profile)
    a.fold_labels(np.array([0.0, 1.0]), np.array([0.0, 0.0]))
    b.fold_labels(np.array([2.0]), np.array([2.0]))
    old.update(np.zeros((1, 2)), np.zeros((1, 3)), 0.001)
    ra, rb, rold = a.snapshot_and_reset(), b.snapshot_and_reset(), old.snapshot_and_reset()
    merged = merge_reports(merge_reports(rold, ra), rb)
    assert merged.performance is not None and merged.performance.confusion.trace() == 2
    assert merged.performance.labelled == 3
    assert ra.performance is not None and ra.performance.labelled == 2  # inputs unchanged


def test_old_reports_decode_and_profiles_keep_their_digest() -> None:
    sk = _sketch(_profile(3))
    sk.update(np.zeros((2, 2)), np.zeros((2, 3)), 0.001)
    payload = encode_report(sk.snapshot_and_reset())
    body = cbor2.loads(payload[1:]) if payload[0] == 0 else None
    assert body is None or len(body) == 24  # byte-for-byte the old layout
    assert decode_report(payload).performance is None
    plain = _profile(3)
    doc = plain.model_dump(mode="json")
    doc.pop("performance")
    assert profile_digest(plain) == profile_digest(ReferenceProfile.model_validate(doc))
    with_spec = _profile(3, PerformanceSpec(task="classification", classes=3))
    assert profile_digest(with_spec) != profile_digest(plain)


@pytest.mark.parametrize("mutate", [
    lambda v: v.__setitem__(0, 5),                          # unknown task
    lambda v: v.__setitem__(1, MAX_CLASSES + 1),            # too many classes
    lambda v: v.__setitem__(1, 2),                          # 3x3 bytes under a 2-class header
    lambda v: v.__setitem__(2, [1, b"\x00" * 8]),           # confusion not k*k
    lambda v: v.__setitem__(5, [1, b"\x00" * 7]),           # confidence histogram of 7 bins
    lambda v: v.__setitem__(4, [0.0, float("nan"), 0.0]),   # non-finite sums
    lambda v: v.__setitem__(7, [1, b"\x00" * 2]),           # feedback counts short
    lambda v: v.pop(),                                      # a field missing
])
def test_malformed_performance_fields_are_refused(mutate: object) -> None:
    sk = _sketch(_profile(3))
    sk.fold_labels(np.array([0.0]), np.array([0.0]))
    perf = sk.snapshot_and_reset().performance
    assert perf is not None
    v = encode_performance(perf)
    assert decode_performance(list(v)).confusion.shape == (3, 3)
    mutate(v)  # type: ignore[operator]
    with pytest.raises(MessageError):
        decode_performance(v)


def test_a_confusion_matrix_of_other_dimensions_than_the_model_is_refused() -> None:
    sk = _sketch(_profile(4))
    sk.fold_labels(np.array([0.0]), np.array([0.0]))
    perf = sk.snapshot_and_reset().performance
    assert perf is not None
    check_performance_shape(perf, _profile(4))
    with pytest.raises(MessageError, match="model has 3 classes"):
        check_performance_shape(perf, _profile(3))
    with pytest.raises(MessageError, match="regression"):
        check_performance_shape(perf, _profile(1))


def test_spec_rules() -> None:
    with pytest.raises(ValueError, match="classes"):
        PerformanceSpec(task="classification", classes=1)
    with pytest.raises(ValueError, match="classifiers only"):
        PerformanceSpec(task="regression", calibration=CAL)
    with pytest.raises(ValueError, match="non-decreasing"):
        Calibration(knots_x=[0.5, 0.4], knots_y=[0.1, 0.2], bin_se=[0.1] * CONFIDENCE_BINS,
                    holdout_rows=10, holdout_accuracy=0.5)
