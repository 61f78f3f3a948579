"""The pure alert rules: episodes (flapping, escalation, end), regressions (sample floor), offline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.contract.telemetry import LATENCY_BUCKETS, latency_bucket
from fleet.errors import FleetMisuseError
from fleet.telemetry.alert_rules import (
    DeviceSeen,
    Episode,
    RegressionRule,
    ServingSample,
    error_regression,
    latency_regression,
    offline_devices,
    pick_baselines,
    step_episode,
)
from fleet.telemetry.health import GateStop, gate_observations, offline_observation, regression_observations


def _walk(observations: list[tuple[bool, set[str]]], clear_after: int = 2) -> list[str]:
    """What each observation does: open / escalate:<members> / end / -."""
    ep: Episode | None = None
    out = []
    for t, (firing, members) in enumerate(observations):
        step = step_episode(ep, firing, float(t), clear_after, members)
        out.append("open" if step.opened else f"escalate:{','.join(sorted(step.escalated))}"
                   if step.escalated else "end" if step.ended else "-")
        ep = step.episode
    return out


@pytest.mark.unit
def test_an_episode_opens_once_survives_flapping_and_ends_after_clean_observations() -> None:
    obs = [(True, {"a"}), (False, set()), (True, {"a"}), (False, set()), (False, set()), (True, {"a"})]
    assert _walk(obs) == ["open", "-", "-", "-", "end", "open"]
    assert _walk(obs, clear_after=1) == ["open", "end", "open", "end", "-", "open"]
    assert _walk([(False, set())] * 3) == ["-", "-", "-"]  # nothing fires: nothing opens
    with pytest.raises(FleetMisuseError):
        step_episode(None, True, 0.0, 0)


@pytest.mark.unit
def test_new_members_escalate_once_and_shrinking_or_returning_members_do_not() -> None:
    obs = [(True, {"a"}), (True, {"a", "b", "c"}), (True, {"a"}), (True, {"a", "b"}), (True, {"d"})]
    assert _walk(obs) == ["open", "escalate:b,c", "-", "-", "escalate:d"]
    ep = None
    for t, (firing, members) in enumerate(obs):
        ep = step_episode(ep, firing, float(t), 2, members).episode
    assert ep is not None and ep.members == {"a", "b", "c", "d"} and ep.escalations == 2
    assert (ep.opened_at, ep.last_seen, ep.consecutive) == (0.0, 4.0, 5)
    # a clean observation breaks the consecutive count (what the retraining trigger needs)
    cleaned = step_episode(ep, False, 5.0, 3).episode
    assert cleaned is not None and cleaned.consecutive == 0 and cleaned.clear_streak == 1


def _sample(version: str, requests: int, errors: int = 0, rejected: int = 0, latency_s: float = 0.002,
            first: float = 0.0) -> ServingSample:
    counts = np.zeros(LATENCY_BUCKETS, np.int64)
    counts[latency_bucket(latency_s)] = requests
    return ServingSample(version, requests, errors, rejected, counts, first, 3)


RULE = RegressionRule(min_requests=200)


@pytest.mark.unit
def test_error_regression_needs_the_sample_floor_a_margin_and_significance() -> None:
    base = _sample("1", 5000, errors=50)  # 1 %
    assert error_regression(_sample("2", 199, errors=150), base, RULE) is None  # tiny sample: no verdict
    assert error_regression(_sample("2", 5000, errors=150), _sample("1", 100), RULE) is None  # tiny baseline
    bad = error_regression(_sample("2", 2000, errors=200), base, RULE)  # 10 %
    assert bad is not None and bad.firing and bad.statistic == "failure_rate"
    assert bad.value == pytest.approx(0.1) and bad.threshold == pytest.approx(0.03)
    assert bad.evidence["candidate_attempts"] == 2000 and bad.evidence["z"] > 10
    assert "10.00% of 2000 requests vs 1.00% of 5000 on 1" in bad.detail
    within = error_regression(_sample("2", 2000, errors=50), base, RULE)  # 2.5 %: inside the 2 % margin
    assert within is not None and not within.firing
    # over the margin but not significant: 6 of 20 vs 0 of 20 is z 2.7, under a min_z of 3.5
    loose = RegressionRule(min_requests=20, max_error_increase=0.02, min_z=3.5)
    noisy = error_regression(_sample("2", 20, errors=6), _sample("1", 20), loose)
    assert noisy is not None and not noisy.firing and noisy.value > 0.2
    # requests refused before inference count against the candidate (they are not in `requests`)
    refused = error_regression(_sample("2", 1000, rejected=400), base, RULE)
    assert refused is not None and refused.firing and refused.value == pytest.approx(400 / 1400)


@pytest.mark.unit
def test_latency_regression_compares_p95_above_the_floor() -> None:
    base = _sample("1", 1000, latency_s=0.002)
    slow = latency_regression(_sample("2", 1000, latency_s=0.008), base, RULE)
    assert slow is not None and slow.firing and slow.value == pytest.approx(4.0, rel=0.2)
    assert slow.statistic == "latency_p95_ratio" and slow.threshold == 1.5
    same = latency_regression(_sample("2", 1000, latency_s=0.0021), base, RULE)
    assert same is not None and not same.firing
    assert latency_regression(_sample("2", 50, latency_s=1.0), base, RULE) is None
    # refused requests have no latency: they do not lift a sample over the floor
    assert latency_regression(_sample("2", 10, rejected=1000, latency_s=1.0), base, RULE) is None
    with pytest.raises(FleetMisuseError):
        RegressionRule(max_latency_ratio=1.0)


@pytest.mark.unit
def test_the_baseline_is_the_version_that_served_the_cohort_first() -> None:
    assert pick_baselines([_sample("2", 1, first=120.0), _sample("1", 1, first=60.0),
                           _sample("3", 1, first=180.0)]) == {"2": "1", "3": "1"}
    assert pick_baselines([_sample("1", 1)]) == {}
    obs = regression_observations({("m", "eu"): [_sample("1", 5000, errors=50, first=0.0),
                                                 _sample("2", 2000, errors=200, first=60.0)],
                                   ("m", "us"): [_sample("2", 10, errors=10, first=0.0),
                                                 _sample("1", 10, first=60.0)]}, RULE, 1000.0, 900.0)
    assert [(o.kind, o.version, o.cohort, o.baseline, o.firing) for o in obs] == [
        ("error_rate", "2", "eu", "1", True), ("latency", "2", "eu", "1", False)]  # us: below the floor


@pytest.mark.unit
def test_offline_devices_beyond_the_threshold_and_never_heard_ones_are_not_offline() -> None:
    seen = [DeviceSeen("a", False, 0.0), DeviceSeen("b", False, 950.0), DeviceSeen("c", True, 0.0),
            DeviceSeen("d", False, None)]
    assert offline_devices(seen, 1000.0, 600.0) == {"a": 1000.0}
    o = offline_observation(seen, 1000.0, 600.0)
    assert (o.kind, o.subject, o.firing, o.members, o.value, o.threshold) == (
        "offline", "devices", True, ("a",), 1000.0, 600.0)
    quiet = offline_observation(seen, 1000.0, 5000.0)
    assert not quiet.firing and quiet.members == () and quiet.value == 0.0


@pytest.mark.unit
def test_gate_observations_fire_for_stopped_rollouts_and_end_the_others() -> None:
    stops = [GateStop("r1", "mlp:2.0.0", "paused", 1, "latency p95 x3"),
             GateStop("r2", "mlp:3.0.0", "rolling_back", 0, "2 local rollbacks")]
    obs = gate_observations(stops, [("r1", "mlp", "2.0.0"), ("r9", "mlp", "1.0.0")], 5.0)
    assert [(o.subject, o.firing, o.statistic, o.members, o.model, o.version) for o in obs] == [
        ("r1", True, "paused", ("stage 1",), "mlp", "2.0.0"),
        ("r2", True, "aborted", ("stage 0",), "mlp", "3.0.0"),
        ("r9", False, "", (), "mlp", "1.0.0")]  # its episode's key, so the step finds it
    assert all(o.clear_after == 1 for o in obs) and math.isnan(obs[0].threshold)
