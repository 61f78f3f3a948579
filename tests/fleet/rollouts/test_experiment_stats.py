"""Device-level, always-valid A/B statistics: calibration under peeking, correlation, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleet.rollouts.experiment_stats import (
    ArmEstimate,
    DeviceTotals,
    compare_sequential,
    confidence_sequence,
    devices_per_arm_for,
    mean_estimate,
    msprt_p_value,
    ratio_estimate,
    sequential_devices_per_arm,
)
from fleet.rollouts.experiments import two_proportion_z

pytestmark = pytest.mark.unit


def _arm(rng: np.random.Generator, rates: np.ndarray, requests: int) -> tuple[np.ndarray, np.ndarray]:
    trials = rng.poisson(requests, rates.size).astype(float)
    return rng.binomial(trials.astype(int), rates).astype(float), trials


def test_the_delta_method_sees_device_correlation_that_a_per_request_test_ignores() -> None:
    rng = np.random.default_rng(1)
    false_device = false_request = 0
    for _ in range(200):  # A/A: devices differ (site, sensor), arms do not
        ya, xa = _arm(rng, rng.beta(2, 38, 30), 2000)
        yb, xb = _arm(rng, rng.beta(2, 38, 30), 2000)
        a = ratio_estimate([DeviceTotals(e, t) for e, t in zip(ya, xa, strict=True)])
        b = ratio_estimate([DeviceTotals(e, t) for e, t in zip(yb, xb, strict=True)])
        z = (b.value - a.value) / math.sqrt(a.variance + b.variance)
        false_device += abs(z) > 1.96
        z_p = two_proportion_z(int(ya.sum()), int(xa.sum()), int(yb.sum()), int(xb.sum()))[1]
        false_request += z_p < 0.05
    assert false_device / 200 <= 0.09  # about the nominal 0.05
    assert false_request / 200 >= 0.5  # requests treated as independent: most A/A tests "win"


def test_reading_after_every_window_keeps_the_false_positive_rate() -> None:
    rng = np.random.default_rng(2)
    rejected = 0
    for _ in range(100):
        ya = xa = yb = xb = np.zeros(20)
        ra, rb = rng.beta(3, 57, 20), rng.beta(3, 57, 20)
        p = 1.0
        hit = False
        for _window in range(15):
            da, na = _arm(rng, ra, 200)
            db, nb = _arm(rng, rb, 200)
            ya, xa, yb, xb = ya + da, xa + na, yb + db, xb + nb
            v = compare_sequential(ratio_estimate([DeviceTotals(e, t) for e, t in zip(ya, xa, strict=True)]),
                                   ratio_estimate([DeviceTotals(e, t) for e, t in zip(yb, xb, strict=True)]),
                                   tau=0.02, alpha=0.05, previous_p=p)
            assert v.p_value <= p  # always-valid p-values never rise
            p, hit = v.p_value, hit or v.significant
        rejected += hit
    assert rejected / 100 <= 0.06


def test_a_real_lift_is_found_and_its_confidence_sequence_covers_it() -> None:
    rng = np.random.default_rng(3)
    ya, xa = _arm(rng, rng.beta(5, 95, 80), 3000)
    yb, xb = _arm(rng, np.clip(rng.beta(5, 95, 80) + 0.03, 0, 1), 3000)
    a = ratio_estimate([DeviceTotals(e, t) for e, t in zip(ya, xa, strict=True)])
    b = ratio_estimate([DeviceTotals(e, t) for e, t in zip(yb, xb, strict=True)])
    v = compare_sequential(a, b, tau=0.02, alpha=0.05, metrics=2)
    assert v.significant and v.alpha == 0.025 and v.ci_low < 0.03 < v.ci_high and v.ci_low > 0


def test_too_few_devices_give_no_verdict_however_many_requests() -> None:
    few = ArmEstimate(0.01, 1e-12, 3)
    v = compare_sequential(few, ArmEstimate(0.5, 1e-12, 3), tau=0.1, alpha=0.05, min_devices=10)
    assert not v.enough_devices and not v.significant and v.p_value == 1.0
    assert (v.ci_low, v.ci_high) == (-math.inf, math.inf)


def test_degenerate_inputs_are_not_evidence() -> None:
    assert ratio_estimate([]).devices == 0 and math.isinf(ratio_estimate([]).variance)
    assert ratio_estimate([DeviceTotals(3, 0)]).devices == 0  # no requests, no evidence
    assert math.isinf(ratio_estimate([DeviceTotals(1, 10)]).variance)
    assert mean_estimate([math.nan, 2.0, 4.0]) == ArmEstimate(3.0, 1.0, 2)
    assert msprt_p_value(0.1, 0.0, 0.1) == 1.0 and msprt_p_value(math.nan, 1.0, 0.1) == 1.0
    assert confidence_sequence(0.0, math.inf, 0.1, 0.05) == (-math.inf, math.inf)
    assert devices_per_arm_for(0.0, 1.0, 0.05) == sequential_devices_per_arm(0.0, 1.0, 0.1, 0.05) == 10**9


def test_designs_match_the_textbook_and_sequential_asks_for_more() -> None:
    assert devices_per_arm_for(0.5, 1.0, 0.05) == 63  # 2 (1.96 + 0.84)^2 / 0.25
    assert sequential_devices_per_arm(0.5, 1.0, 0.5, 0.05) > 63
