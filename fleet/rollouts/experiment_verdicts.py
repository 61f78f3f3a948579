"""From each arm's evidence to a recommendation: device-level, always-valid, corrected.

Why this shape (issue 19): devices, not requests, are assigned to arms, and requests from one
device are correlated (same site, sensor, user), so a test over requests makes p-values far too
small; and the experiment is read again and again while it runs, over several metrics. So:

- `error_rate` is the ratio of sums over the arm's devices with its delta-method variance
  (`ratio_estimate`); `latency_ms` is the mean of per-device mean latencies (`mean_estimate`).
  Both come from the per-device telemetry totals (fleet/telemetry/device_totals.py).
- Any other metric comes from pushed observations, which carry no device: each observation is
  a unit (`mean_estimate` over the values), and the verdict says so (`unit: "observation"`).
  Observations are only as independent as the tool that pushed them makes them.
- Every metric is tested with the normal-mixture SPRT (`compare_sequential`) at `alpha / k`
  over the experiment's k metrics (Bonferroni), with no verdict below `min_devices` units per
  arm. The always-valid p-value is the running minimum over reads and the confidence sequence
  the running intersection (`SequentialState`, persisted by the repo), so a verdict once
  reached never flips back; `tau`, the mixing scale of the test, is fixed at the first read
  that counted.
- `devices_needed` is the design's figure (`sequential_devices_per_arm`) for an effect of
  `tau` (the smallest effect of interest) at 80 % power, at the observed per-device spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from fleet.rollouts.experiment_stats import (
    ArmEstimate,
    DeviceTotals,
    compare_sequential,
    mean_estimate,
    ratio_estimate,
    sequential_devices_per_arm,
)
from fleet.telemetry.device_totals import DeviceVersionTotals

Goal = Literal["min", "max"]
Unit = Literal["device", "observation"]
MAX_SAMPLE = 5000  # per arm and metric, for the descriptive rank effect size
DEFAULT_TAU_ERROR_RATE = 0.01  # one point of error rate
DEFAULT_TAU_SHARE = 0.10  # other metrics: 10 % of arm A's mean
DESIGN_POWER = 0.8
TESTS = {
    "error_rate": "mSPRT, device-level ratio of sums (delta method)",
    "latency_ms": "mSPRT, mean of per-device mean latency",
    "observation": "mSPRT, per-observation mean (pushed observations carry no device)",
}


@dataclass
class ArmData:
    """Evidence for one arm: per-device telemetry totals, request/error counts (their sums),
    pushed observations per metric as (value, weight), and the arm's merged per-request latency
    histogram (ms, count), which only describes the distribution (p95) and is never tested."""

    requests: int = 0
    errors: int = 0
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    devices: list[DeviceVersionTotals] = field(default_factory=list)
    latency_histogram: list[tuple[float, int]] = field(default_factory=list)

    def sample(self, metric: str) -> np.ndarray:
        """A representative sample (evenly spaced order statistics when the data is large)."""
        values = self.values(metric)
        values.sort()
        if values.size > MAX_SAMPLE:
            values = values[np.linspace(0, values.size - 1, MAX_SAMPLE).round().astype(int)]
        return values

    def values(self, metric: str) -> np.ndarray:
        """Every pushed observation of `metric`, weights expanded."""
        pairs = self.samples.get(metric) or []
        if not pairs:
            return np.zeros(0)
        return np.repeat([v for v, _ in pairs], [max(0, w) for _, w in pairs]).astype(float)

    def count(self, metric: str) -> int:
        """Requests (error_rate), timed requests (latency_ms from devices) or observations."""
        if metric == "error_rate":
            return self.requests
        if metric == "latency_ms" and any(d.latency_count for d in self.devices):
            return sum(d.latency_count for d in self.devices)
        return sum(max(0, w) for _, w in self.samples.get(metric) or [])


@dataclass(frozen=True)
class SequentialState:
    """What earlier reads of one metric established: the running minimum of the always-valid
    p-value, the running intersection of the confidence sequence, and the `tau` they used."""

    p_value: float
    ci_low: float
    ci_high: float
    tau: float


@dataclass(frozen=True)
class MetricVerdict:
    metric: str
    goal: Goal
    test: str
    n_a: int  # requests, timed requests or observations
    n_b: int
    value_a: float | None  # the tested estimate: error rate, mean of device means, mean
    value_b: float | None
    p_value: float | None  # always-valid (running minimum over reads); None without data
    effect_size: float | None  # B - A for error_rate; rank-biserial r over the units otherwise
    winner: Literal["a", "b"] | None
    more_samples_needed: int
    p95_a: float | None = None  # 95th percentile (latency: of requests; others: of observations)
    p95_b: float | None = None
    unit: Unit = "device"
    effect: float | None = None  # B - A on the metric's scale
    ci_low: float | None = None  # always-valid confidence sequence for the effect, at `level`
    ci_high: float | None = None
    level: float | None = None  # alpha / number of metrics (Bonferroni)
    tau: float | None = None
    devices_a: int = 0  # devices with evidence (0 for per-observation metrics)
    devices_b: int = 0
    devices_needed: int = 0  # per arm, the sequential design's figure (0 per observation)
    counted: bool = False  # this read had enough units and samples to update the test

    def state(self) -> SequentialState | None:
        """The state to keep for the next read, when this read counted."""
        if not self.counted or self.p_value is None or self.tau is None or \
                self.ci_low is None or self.ci_high is None:
            return None
        return SequentialState(self.p_value, self.ci_low, self.ci_high, self.tau)


@dataclass(frozen=True)
class Recommendation:
    verdict: Literal["a", "b", "conflicting", "inconclusive"]
    summary: str
    metrics: list[MetricVerdict]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "summary": self.summary,
                "metrics": [{k: v for k, v in asdict(m).items() if k != "counted"} for m in self.metrics]}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _estimates(metric: str, a: ArmData, b: ArmData) -> tuple[Unit, str, ArmEstimate, ArmEstimate,
                                                              np.ndarray, np.ndarray]:
    """(unit, test, estimate A, estimate B, unit values A, B) of a metric."""
    if metric == "error_rate":
        est = [ratio_estimate([DeviceTotals(d.errors, d.requests) for d in arm.devices]) for arm in (a, b)]
        return "device", TESTS[metric], est[0], est[1], np.zeros(0), np.zeros(0)
    if metric == "latency_ms" and (any(d.latency_count for d in a.devices + b.devices)
                                   or not (a.samples.get(metric) or b.samples.get(metric))):
        means = [np.array([d.latency_mean_ms for d in arm.devices if d.latency_count]) for arm in (a, b)]
        return ("device", TESTS[metric], mean_estimate(means[0].tolist()), mean_estimate(means[1].tolist()),
                means[0], means[1])
    xa, xb = a.values(metric), b.values(metric)
    return "observation", TESTS["observation"], mean_estimate(xa.tolist()), mean_estimate(xb.tolist()), xa, xb


def default_tau(metric: str, a: ArmEstimate) -> float:
    """The effect of interest when the experiment names none: a point of error rate, else 10 %
    of arm A's mean (the unit spread when that mean is 0); 1.0 with no evidence at all."""
    if metric == "error_rate":
        return DEFAULT_TAU_ERROR_RATE
    if math.isfinite(a.value) and a.value != 0:
        return DEFAULT_TAU_SHARE * abs(a.value)
    spread = math.sqrt(a.variance * a.devices) if a.devices > 1 and math.isfinite(a.variance) else 0.0
    return spread if spread > 0 else 1.0


def _rank_effect(xa: np.ndarray, xb: np.ndarray) -> float | None:
    """Rank-biserial r = P(B > A) - P(B < A) over the units (descriptive)."""
    if not (xa.size and xb.size):
        return None
    xa, xb = np.sort(xa)[:: max(1, xa.size // MAX_SAMPLE)], np.sort(xb)[:: max(1, xb.size // MAX_SAMPLE)]
    below = np.searchsorted(xa, xb, side="left").sum()  # pairs with A < B
    above = (xa.size - np.searchsorted(xa, xb, side="right")).sum()  # pairs with A > B
    return float((below - above) / (xa.size * xb.size))


def _better(goal: Goal, diff_b_minus_a: float) -> Literal["a", "b"]:
    return "b" if (diff_b_minus_a < 0) == (goal == "min") else "a"


def _p95(metric: str, arm: ArmData) -> float | None:
    if metric == "error_rate":
        return None
    pairs = arm.latency_histogram if metric == "latency_ms" and arm.latency_histogram else None
    if pairs:
        values, weights = np.array([v for v, _ in pairs]), np.cumsum([w for _, w in pairs])
        return float(values[min(int(np.searchsorted(weights, 0.95 * weights[-1])), values.size - 1)])
    x = arm.values(metric)
    return float(np.quantile(x, 0.95)) if x.size else None


def compare_metric(metric: str, goal: Goal, a: ArmData, b: ArmData, alpha: float, metrics: int = 1,
                   min_samples: int = 1, min_devices: int = 10, tau: float | None = None,
                   previous: SequentialState | None = None) -> MetricVerdict:
    """One metric's always-valid comparison at `alpha / metrics`, continuing `previous`."""
    unit, test, est_a, est_b, xa, xb = _estimates(metric, a, b)
    n_a, n_b = a.count(metric), b.count(metric)
    tau = previous.tau if previous else tau if tau else default_tau(metric, est_a)
    v = compare_sequential(est_a, est_b, tau, alpha, metrics, min_devices,
                           previous.p_value if previous else 1.0)
    counted = v.enough_devices and min(n_a, n_b) >= min_samples
    p, lo, hi = (v.p_value, v.ci_low, v.ci_high) if counted else (1.0, -math.inf, math.inf)
    if previous is not None:  # carry what earlier reads established: never forget a rejection
        p = min(p, previous.p_value)
        lo, hi = max(lo, previous.ci_low), min(hi, previous.ci_high)
        if lo > hi:  # the data contradict earlier reads (the effect moved): keep the established
            lo, hi = previous.ci_low, previous.ci_high
    effect = v.effect if math.isfinite(v.effect) else None
    side = 1.0 if lo > 0 else -1.0 if hi < 0 else (effect or 0.0)
    winner = _better(goal, side) if p < v.alpha and side else None
    units_a, units_b = est_a.devices, est_b.devices
    sds = [math.sqrt(e.variance * e.devices) for e in (est_a, est_b)
           if e.devices > 1 and math.isfinite(e.variance)]  # one unit's spread, per arm
    design = sequential_devices_per_arm(tau, float(np.mean(sds)), tau, v.alpha, DESIGN_POWER) if sds else 0
    needed = max(min_devices, min(design, 10**9))
    more_units = 0 if winner else max(0, needed - min(units_a, units_b))
    per_unit = (n_a + n_b) / (units_a + units_b) if unit == "device" and units_a + units_b else 1.0
    more = 0 if winner else max(min_samples - min(n_a, n_b), math.ceil(more_units * per_unit), 0)
    dev = unit == "device"
    return MetricVerdict(
        metric, goal, test, n_a, n_b, _finite(est_a.value), _finite(est_b.value),
        p if (units_a or units_b or previous) else None,
        effect if metric == "error_rate" else _rank_effect(xa, xb), winner, more, _p95(metric, a),
        _p95(metric, b), unit, effect, _finite(lo), _finite(hi), v.alpha, tau,
        units_a if dev else 0, units_b if dev else 0, needed if dev else 0, counted)


def _method(verdicts: Sequence[MetricVerdict], alpha: float) -> str:
    """Which test, on which unit, at which level, and why: the summary's last part."""
    k = len(verdicts)
    by_device = [v.metric for v in verdicts if v.unit == "device"]
    by_obs = [v.metric for v in verdicts if v.unit == "observation"]
    parts = []
    if by_device:
        parts.append(f"device-level always-valid mSPRT for {', '.join(by_device)} (devices are the "
                     "randomised unit and a device's requests are correlated)")
    if by_obs:
        parts.append(f"always-valid mSPRT per observation for {', '.join(by_obs)} (pushed observations "
                     "carry no device, so they are taken as independent)")
    level = f"Bonferroni, each of {k} metrics at {alpha:g}/{k} = {alpha / k:.3g}" if k > 1 else \
        f"one metric, at {alpha:g}"
    return "; ".join(parts) + f"; valid however often the experiment is read; {level}"


def recommend(a: ArmData, b: ArmData, metrics: dict[str, Goal], alpha: float = 0.05,
              min_samples: int = 100, min_devices: int = 10, taus: dict[str, float] | None = None,
              previous: dict[str, SequentialState] | None = None) -> Recommendation:
    """Compare the arms on every metric and say which one to keep (or what is still missing)."""
    taus, previous = taus or {}, previous or {}
    verdicts = [compare_metric(m, g, a, b, alpha, len(metrics), min_samples, min_devices, taus.get(m),
                               previous.get(m)) for m, g in metrics.items()]
    method = _method(verdicts, alpha)
    winners = {v.winner for v in verdicts if v.winner}
    if len(winners) == 1:
        w = winners.pop()
        why = ", ".join(
            f"{v.metric} {v.effect:+.4g} [{v.ci_low:.4g}, {v.ci_high:.4g}] p={v.p_value:.3g} "
            f"at {v.level:.3g}" for v in verdicts if v.winner and v.effect is not None
            and v.ci_low is not None and v.ci_high is not None and v.p_value is not None and v.level)
        return Recommendation(w, f"keep {w.upper()}: {why} ({method})", verdicts)
    if winners:
        sides = ", ".join(f"{v.metric} favours {v.winner.upper()}" for v in verdicts if v.winner)
        return Recommendation("conflicting", f"metrics disagree: {sides} ({method})", verdicts)
    devices = max((v.devices_needed - min(v.devices_a, v.devices_b) for v in verdicts if v.unit == "device"),
                  default=0)
    samples = max((v.more_samples_needed for v in verdicts), default=min_samples)
    detail = ", ".join(f"{v.metric} {min(v.devices_a, v.devices_b)} of {v.devices_needed} devices"
                       if v.unit == "device" else f"{v.metric} {min(v.n_a, v.n_b)} observations"
                       for v in verdicts)
    if devices > 0:
        need = f"need {devices} more devices per arm (about {samples} more samples per arm)"
    elif samples > 0:
        need = f"need {samples} more samples per arm"
    else:
        need = ("no metric is significant, with enough devices per arm to detect an effect of tau "
                "with 80 % power: any difference is smaller than tau")
    return Recommendation("inconclusive", f"inconclusive: {need}: {detail} ({method})", verdicts)
