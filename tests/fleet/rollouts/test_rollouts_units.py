"""Rollout strategies and gates: pure arithmetic with an injected clock."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.errors import FleetInputError
from fleet.rollouts.gates import GateThresholds, OutcomeCounts, VersionMetrics, evaluate, latency_quantile_ms
from fleet.rollouts.strategies import (
    StrategyConfig,
    dispatch_quota,
    exponential_rate,
    stage_count,
    stage_ready_to_advance,
    stage_target,
)

pytestmark = pytest.mark.unit


def test_canary_stage_targets_are_cumulative_and_end_with_everyone() -> None:
    cfg = StrategyConfig.parse({"kind": "canary", "stages": [5, 25, 100]})
    assert stage_count(cfg) == 3
    assert [stage_target(cfg, s, 200) for s in range(3)] == [10, 50, 200]
    # small cohorts still get one canary, never more than the cohort
    assert [stage_target(cfg, s, 3) for s in range(3)] == [1, 1, 3]
    assert [stage_target(cfg, s, 0) for s in range(3)] == [0, 0, 0]
    # a late device grows the cohort: the same stage now allows more
    assert stage_target(cfg, 1, 8) == 2 and stage_target(cfg, 1, 9) == 3


def test_all_at_once_is_one_stage_of_the_whole_cohort() -> None:
    cfg = StrategyConfig.parse({"kind": "all_at_once"})
    assert stage_count(cfg) == 1 and stage_target(cfg, 0, 17) == 17
    assert dispatch_quota(cfg, 0, 17, 5, 0.0, [0.0] * 5, 0) == 12


def test_exponential_rate_grows_by_the_factor_and_is_capped() -> None:
    cfg = StrategyConfig.parse({"kind": "exponential", "base_per_minute": 2, "increment_factor": 2.0,
                                "increase_after_succeeded": 2, "max_per_minute": 5})
    assert exponential_rate(cfg, notified=0, succeeded=0) == 2
    assert exponential_rate(cfg, notified=2, succeeded=2) == 4
    assert exponential_rate(cfg, notified=9, succeeded=9) == 5  # capped
    # two assigned in the last minute at rate 2: nothing more until a minute has passed
    assert dispatch_quota(cfg, 0, 100, 2, 30.0, [0.0, 1.0], 0) == 0
    assert dispatch_quota(cfg, 0, 100, 2, 61.5, [0.0, 1.0], 0) == 2
    # after two successes the rate doubles
    assert dispatch_quota(cfg, 0, 100, 2, 61.5, [0.0, 1.0], 2) == 4
    # by notified count when no success criterion is given
    by_notified = StrategyConfig.parse({"kind": "exponential", "base_per_minute": 3})
    assert by_notified.increase_after_notified == 3
    assert exponential_rate(by_notified, notified=6, succeeded=0) == 12


def test_bake_time_counts_from_the_moment_the_stage_finished() -> None:
    cfg = StrategyConfig.parse({"bake_s": 60})
    assert not stage_ready_to_advance(cfg, 1000.0, None)
    assert not stage_ready_to_advance(cfg, 1059.0, 1000.0)
    assert stage_ready_to_advance(cfg, 1060.0, 1000.0)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"stages": [25, 5, 100]}, "strictly increasing"),
        ({"stages": [5, 50]}, "last stage must be 100"),
        ({"kind": "blue-green"}, "kind"),
        ({"bake_s": -1}, "bake_s"),
        ({"base_per_minute": 50, "max_per_minute": 10}, "max_per_minute"),
        ({"typo_field": 1}, "typo_field"),
        ({"on_breach": "ignore"}, "on_breach"),
    ],
)
def test_bad_strategies_are_refused_with_the_field_named(raw: dict[str, object], match: str) -> None:
    with pytest.raises(FleetInputError, match=match):
        StrategyConfig.parse(raw)


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(FleetInputError, match="max_install_failure_pct"):
        GateThresholds.parse({"max_install_failure_pct": 150})
    with pytest.raises(FleetInputError, match="nonsense"):
        GateThresholds.parse({"nonsense": 1})


def test_outcome_gates_use_finished_devices_only() -> None:
    t = GateThresholds.parse({"max_install_failure_pct": 20, "max_rollback_pct": 10})
    assert evaluate(t, OutcomeCounts(assigned=10, succeeded=9, install_failed=1)) == []
    # a timeout is an install failure
    breaches = evaluate(t, OutcomeCounts(assigned=10, succeeded=3, install_failed=0, timeout=1))
    assert [b.gate for b in breaches] == ["install_failure_pct"] and breaches[0].value == 25.0
    rb = evaluate(t, OutcomeCounts(assigned=5, succeeded=4, local_rollback=1))
    assert [b.gate for b in rb] == ["rollback_pct"]
    # nothing finished yet: no verdict
    assert evaluate(t, OutcomeCounts(assigned=5)) == []
    strict = GateThresholds.parse({"min_finished_devices": 5})
    assert evaluate(strict, OutcomeCounts(assigned=5, local_rollback=4)) == []


def test_metric_gates_compare_against_the_previous_version_with_enough_requests() -> None:
    t = GateThresholds.parse({"max_error_rate_increase": 0.01, "max_latency_p95_ratio": 1.5,
                              "min_requests": 100})
    ok = OutcomeCounts(assigned=3, succeeded=3)
    base = VersionMetrics(requests=1000, errors=10, latency_p95_ms=2.0)
    worse = VersionMetrics(requests=1000, errors=40, latency_p95_ms=4.0)
    gates = {b.gate for b in evaluate(t, ok, worse, base)}
    assert gates == {"error_rate_increase", "latency_p95_ratio"}
    assert evaluate(t, ok, VersionMetrics(requests=1000, errors=12, latency_p95_ms=2.5), base) == []
    # too few requests on the candidate: metric gates stay silent
    assert evaluate(t, ok, VersionMetrics(requests=50, errors=40, latency_p95_ms=9.0), base) == []


def test_drift_and_shadow_gates_need_no_baseline() -> None:
    t = GateThresholds()
    ok = OutcomeCounts()
    out = evaluate(t, ok, VersionMetrics(drift_score=0.75, shadow_agreement=0.6))
    assert {b.gate for b in out} == {"drift_score", "shadow_agreement"}
    assert evaluate(t, ok, VersionMetrics(drift_score=0.1, shadow_agreement=0.99)) == []


def test_latency_quantile_of_an_empty_histogram_is_none() -> None:
    assert latency_quantile_ms(np.zeros(10, np.int64), 0.95) is None
    counts = np.zeros(20, np.int64)
    counts[4] = 100
    assert latency_quantile_ms(counts, 0.95) == pytest.approx(latency_quantile_ms(counts, 0.5))
