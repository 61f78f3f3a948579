"""Drift from binned sketches vs exact statistics on the raw values; alarms and their absence."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy import stats

from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry import NumericSketch, TelemetryReport
from agent.telemetry import TelemetrySketch
from fleet.errors import FleetInputError
from fleet.registry.profile import compute_reference_profile
from fleet.telemetry.drift import (
    PSI_FLOOR,
    DriftThresholds,
    categorical_drift,
    compare_reports,
    min_rows_for_budget,
    numeric_drift,
    report_drift,
)


def _fold(profile: ReferenceProfile, x: np.ndarray, y: np.ndarray | None = None) -> TelemetryReport:
    sk = TelemetrySketch(profile, "dev", "m", "1.0.0", resource_probe=lambda: (0, 0.0, 0.0))
    sk.update(x, y, 0.001)
    return sk.snapshot_and_reset()


def _draw(rng: np.random.Generator, kind: str, n: int, shift: float) -> np.ndarray:
    if kind == "normal":
        return rng.normal(shift, 1.0, n)
    if kind == "student_t":
        return rng.standard_t(3, n) + shift * np.sqrt(3.0)  # shift in units of the std
    return rng.lognormal(0.0, 1.0, n) + shift * 2.16


def _exact_psi(ref: np.ndarray, cur: np.ndarray, edges: np.ndarray) -> float:
    bins = lambda v: np.bincount(np.searchsorted(edges, v, side="right"), minlength=edges.size + 1)  # noqa: E731
    p, q = bins(ref) / ref.size, bins(cur) / cur.size
    p, q = np.where(p == 0, PSI_FLOOR, p), np.where(q == 0, PSI_FLOOR, q)
    return float(np.sum((p - q) * np.log(p / q)))


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["normal", "student_t", "lognormal"])
@pytest.mark.parametrize("shift", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("m", [400, 4000])
def test_estimates_match_exact_statistics_on_raw_values(kind: str, shift: float, m: int) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{kind}/{shift}/{m}".encode()))
    ref, cur = _draw(rng, kind, 20000, 0.0), _draw(rng, kind, m, shift)
    prof = compute_reference_profile(ref.reshape(-1, 1), ["x"])
    f = report_drift(prof, _fold(prof, cur.reshape(-1, 1)), method="evidently").features[0]
    exact_ks = stats.ks_2samp(ref, cur).statistic
    assert f.stats["ks_lower"] <= exact_ks + 1e-12 <= f.stats["ks_lower"] + f.stats["ks_error"] + 1e-12
    assert abs(f.stats["ks"] - exact_ks) < 0.006
    exact_w = stats.wasserstein_distance(ref, cur) / ref.std()
    assert f.stats["wasserstein_lower"] <= exact_w + 1e-9
    assert exact_w <= f.stats["wasserstein_norm"] + f.stats["wasserstein_error"] + 1e-9
    if kind == "normal":
        assert abs(f.stats["wasserstein_norm"] - exact_w) <= 0.01 + 0.05 * exact_w
    assert f.stats["psi"] == pytest.approx(_exact_psi(ref, cur, np.asarray(prof.features[0].edges)), rel=1e-9)
    assert f.method == ("ks" if m <= 1000 else "wasserstein")
    if shift == 0.5:
        assert f.drifted


@pytest.mark.unit
@pytest.mark.parametrize("m", [500, 5000])
def test_no_dataset_drift_alarm_on_undrifted_data_across_seeds(m: int) -> None:
    alarms, feature_alarms = 0, 0
    for seed in range(20):
        rng = np.random.default_rng(1000 + seed)
        ref = np.column_stack([_draw(rng, ("normal", "student_t", "lognormal")[j % 3], 5000, 0.0)
                               for j in range(20)])
        cur = np.column_stack([_draw(rng, ("normal", "student_t", "lognormal")[j % 3], m, 0.0)
                               for j in range(20)])
        prof = compute_reference_profile(ref, [f"f{j}" for j in range(20)])
        verdict = report_drift(prof, _fold(prof, cur))
        alarms += verdict.dataset_drift
        feature_alarms += sum(f.drifted for f in verdict.features)
    assert alarms == 0
    assert feature_alarms <= 0.1 * 400  # KS at p < 0.05 may flag ~5 % of undrifted features


@pytest.mark.unit
@pytest.mark.parametrize("m", [500, 5000])
def test_half_sigma_shift_is_always_detected(m: int) -> None:
    for seed in range(10):
        rng = np.random.default_rng(2000 + seed)
        ref = rng.normal(size=(5000, 20))
        cur = rng.normal(size=(m, 20)) + 0.5
        prof = compute_reference_profile(ref, [f"f{j}" for j in range(20)])
        verdict = report_drift(prof, _fold(prof, cur))
        assert verdict.dataset_drift and verdict.drifted_share == 1.0


@pytest.mark.unit
def test_categorical_shift_by_chi_square_and_jensen_shannon() -> None:
    rng = np.random.default_rng(5)
    p_ref, p_new = [0.5, 0.3, 0.15, 0.05], [0.35, 0.3, 0.2, 0.15]
    ref = rng.choice(4, 20000, p=p_ref).astype(float)
    prof = compute_reference_profile(ref.reshape(-1, 1), ["c"], categorical={"c": []})
    for m, method in ((500, "chisquare"), (20000, "jensenshannon")):
        same = report_drift(prof, _fold(prof, rng.choice(4, m, p=p_ref).reshape(-1, 1).astype(float)),
                            method="evidently")
        moved = report_drift(prof, _fold(prof, rng.choice(4, m, p=p_new).reshape(-1, 1).astype(float)),
                             method="evidently")
        assert same.features[0].method == method and not same.features[0].drifted
        assert moved.features[0].drifted
    cur = rng.choice(4, 3000, p=p_new)
    f = report_drift(prof, _fold(prof, cur.reshape(-1, 1).astype(float))).features[0]
    vocab = [int(v) for v in prof.features[0].vocabulary]
    exact_p = np.array([np.mean(ref == v) for v in vocab])
    exact_q = np.array([np.mean(cur == v) for v in vocab])
    assert f.stats["jensen_shannon"] == pytest.approx(float(stats.entropy(  # JS from its definition
        exact_p, (exact_p + exact_q) / 2) / 2 + stats.entropy(exact_q, (exact_p + exact_q) / 2) / 2) ** 0.5)
    unseen = report_drift(prof, _fold(prof, np.full((600, 1), 9.0)))
    assert unseen.features[0].drifted  # every value outside the vocabulary


@pytest.mark.unit
def test_prediction_drift_and_two_arm_comparison() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6000, 4))
    prof = compute_reference_profile(x, list("abcd"), outputs=x.sum(axis=1))
    xa, xb = rng.normal(size=(3000, 4)), rng.normal(size=(3000, 4))
    arm_a = _fold(prof, xa, xa.sum(axis=1))
    arm_b = _fold(prof, xb, xb.sum(axis=1) + 1.0)  # candidate model's outputs moved
    verdict = report_drift(prof, arm_b)
    assert not verdict.dataset_drift and verdict.prediction_drift
    ab = compare_reports(prof, arm_a, arm_b, method="evidently")
    assert not ab.dataset_drift and ab.prediction_drift and ab.outputs[0].method == "wasserstein"
    budget = compare_reports(prof, arm_a, arm_b)
    assert not budget.dataset_drift and budget.prediction_drift and budget.outputs[0].method == "ks_budget"
    assert not compare_reports(prof, arm_a, _fold(prof, xb, xb.sum(axis=1))).prediction_drift


@pytest.mark.unit
def test_psi_on_request_and_too_few_samples() -> None:
    rng = np.random.default_rng(3)
    prof = compute_reference_profile(rng.normal(size=(5000, 1)), ["x"])
    f = report_drift(prof, _fold(prof, rng.normal(1.0, 1.0, (2000, 1))), method="psi").features[0]
    assert f.method == "psi" and f.drifted and f.threshold == 0.1
    few = report_drift(prof, _fold(prof, rng.normal(size=(5, 1))))
    assert few.features[0].method == "insufficient" and not few.dataset_drift


@pytest.mark.unit
def test_mismatched_inputs_are_refused() -> None:
    rng = np.random.default_rng(3)
    prof = compute_reference_profile(rng.normal(size=(500, 2)), ["x", "y"])
    with pytest.raises(FleetInputError, match="edges"):
        numeric_drift("x", np.arange(5.0), np.ones(6), np.ones(5), 1.0, 0.0, 4.0)
    with pytest.raises(FleetInputError, match="size"):
        categorical_drift("c", np.ones(3), np.ones(4))
    seven = NumericSketch(np.ones(7, dtype=np.int64))
    wrong = TelemetryReport("d", 0, "m", "1.0.0", 0.0, 1.0, [seven, seven], [])
    with pytest.raises(FleetInputError, match="bins"):
        report_drift(prof, wrong)
    with pytest.raises(FleetInputError, match="different"):
        report_drift(prof, TelemetryReport("d", 0, "m", "1.0.0", 0.0, 1.0, [], []))
    assert DriftThresholds().dataset_drift_share == 0.5


@pytest.mark.unit
def test_the_budget_rule_keeps_its_false_alarm_rate_over_many_columns() -> None:
    rng = np.random.default_rng(21)
    ref = np.column_stack([rng.normal(size=20000), rng.standard_t(3, 20000), rng.lognormal(size=20000)] * 7)
    prof = compute_reference_profile(ref, [f"f{j}" for j in range(21)])
    budget = DriftThresholds()
    assert budget.column_alpha(21) == pytest.approx(1 / (1000 * 21))
    alarms = 0
    for _ in range(60):  # Evidently's per-column p < 0.05 alarms on about 2 windows in 3 here
        cur = np.column_stack([rng.normal(size=500), rng.standard_t(3, 500), rng.lognormal(size=500)] * 7)
        verdict = report_drift(prof, _fold(prof, cur))
        assert all(f.method == "ks_budget" for f in verdict.features)
        alarms += any(f.drifted for f in verdict.features)
    assert alarms <= 1
    shifted = rng.normal(size=(10000, 21))
    shifted[:, 0] += 0.1  # a 0.1 sd location shift in one normal feature
    moved = report_drift(prof, _fold(prof, np.column_stack([shifted[:, 0], ref[:10000, 1:]])))
    assert [f.name for f in moved.features if f.drifted] == ["f0"]
    f0 = moved.features[0]
    assert f0.statistic > f0.threshold and f0.stats["ks"] >= f0.statistic and f0.p_value is not None


@pytest.mark.unit
def test_the_budget_sets_the_minimum_window_and_the_effect_floor() -> None:
    rng = np.random.default_rng(22)
    prof = compute_reference_profile(rng.normal(size=(20000, 2)), ["x", "y"])
    floor = min_rows_for_budget(DriftThresholds(), 2)
    assert 30 < floor < 200  # follows from the budget: more columns or a longer run time, more rows
    assert min_rows_for_budget(DriftThresholds(windows_per_false_alarm=1e6), 2) > floor
    tiny = report_drift(prof, _fold(prof, rng.normal(3.0, 1.0, (floor - 1, 2))))
    assert {f.method for f in tiny.features} == {"insufficient"} and not tiny.dataset_drift
    assert all(f.drifted for f in report_drift(prof, _fold(prof, rng.normal(3.0, 1.0, (floor, 2)))).features)
    # Large samples make a 0.03 sd shift (KS about 0.012) significant; the floor keeps it quiet
    big_prof = compute_reference_profile(rng.normal(size=(200000, 1)), ["x"])
    big = _fold(big_prof, rng.normal(0.03, 1.0, (400000, 1)))
    f = report_drift(big_prof, big).features[0]
    assert f.threshold == DriftThresholds().min_effect_ks and not f.drifted
    strict = report_drift(big_prof, big, DriftThresholds(min_effect_ks=0.0)).features[0]
    assert strict.threshold < 0.01 and strict.drifted
