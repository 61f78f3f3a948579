"""Device-level, always-valid statistics for A/B experiments (pure functions over per-device data).

Why device-level: devices, not requests, are assigned to arms, and requests from one device are
correlated (same site, sensor, user). A test that treats every request as independent makes
p-values far too small. Here the unit is the device:

- A rate metric (errors per request) is a ratio of sums per arm, `R = sum(errors) / sum(requests)`,
  with the delta-method (cluster-robust) variance `Var(R) ~ s^2(e) / (n * mean(x)^2)`, where
  `e_i = y_i - R x_i` are the per-device residuals (Deng, Knoblich & Lu 2018, "Applying the
  delta method in metric analytics").
- A mean metric (latency, pushed observations) is averaged per device first, then compared
  as a difference of means with the Welch variance.
- Valid under continuous monitoring: the controller reads an experiment after every window,
  so a fixed-horizon p-value read again and again inflates false positives. The test is the
  normal-mixture sequential probability ratio test (mSPRT; Johari, Pekelis & Walsh 2017,
  "Always valid inference"): with `theta` the difference B - A, `V` its variance and a mixing
  variance `tau^2`, `Lambda = sqrt(V / (V + tau^2)) exp(tau^2 theta^2 / (2 V (V + tau^2)))`;
  the always-valid p-value is the running minimum of `1 / Lambda`, and rejecting when it drops
  below alpha keeps the type I error at most alpha however often the data is looked at.
  `tau` is the effect of interest per metric (a sensible default: the minimum effect the
  operator cares about).
- Several metrics: Bonferroni, each metric at `alpha / k`.
- No verdict below `min_devices` per arm (the variance estimate needs devices, not requests).
- Effect sizes come with an always-valid confidence sequence at the same level (the set of
  effects the mSPRT would not reject), so the interval can be read at any time too.
Assumptions: devices are independent of each other and assigned at random; per-device values
are not heavy-tailed enough to break the normal approximation of the arm means (at least
`min_devices` devices per arm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

Arm = Literal["a", "b"]


@dataclass(frozen=True)
class DeviceTotals:
    """One device's evidence for a rate metric: `events` (errors) out of `trials` (requests)."""

    events: float
    trials: float


@dataclass(frozen=True)
class ArmEstimate:
    """An arm's estimate of a metric and the variance of that estimate, over `devices` units."""

    value: float
    variance: float
    devices: int


@dataclass(frozen=True)
class SequentialVerdict:
    """One metric's always-valid comparison of B against A."""

    effect: float  # B - A
    ci_low: float
    ci_high: float
    p_value: float  # always-valid (running minimum when `previous_p` was given)
    alpha: float  # the level this metric is tested at (after the correction across metrics)
    significant: bool
    devices_a: int
    devices_b: int
    enough_devices: bool


def ratio_estimate(devices: Sequence[DeviceTotals]) -> ArmEstimate:
    """Ratio of sums with its delta-method variance (devices with no trials carry no evidence)."""
    used = [d for d in devices if d.trials > 0]
    n = len(used)
    if n == 0:
        return ArmEstimate(math.nan, math.inf, 0)
    y = np.array([d.events for d in used], dtype=float)
    x = np.array([d.trials for d in used], dtype=float)
    r = float(y.sum() / x.sum())
    if n < 2:
        return ArmEstimate(r, math.inf, n)
    resid = y - r * x
    var = float(resid.var(ddof=1) / (n * x.mean() ** 2))
    return ArmEstimate(r, var, n)


def mean_estimate(per_device_means: Sequence[float]) -> ArmEstimate:
    """Mean of per-device means with the variance of that mean."""
    v = np.asarray([m for m in per_device_means if math.isfinite(m)], dtype=float)
    if v.size == 0:
        return ArmEstimate(math.nan, math.inf, 0)
    var = float(v.var(ddof=1) / v.size) if v.size > 1 else math.inf
    return ArmEstimate(float(v.mean()), var, int(v.size))


def msprt_p_value(theta: float, variance: float, tau: float) -> float:
    """`1 / Lambda` of the normal-mixture SPRT for H0: theta = 0 (capped at 1)."""
    if not (math.isfinite(theta) and math.isfinite(variance)) or variance <= 0 or tau <= 0:
        return 1.0
    t2 = tau * tau
    log_lambda = (0.5 * math.log(variance / (variance + t2))
                  + t2 * theta * theta / (2 * variance * (variance + t2)))
    return float(min(1.0, math.exp(-log_lambda)))


def confidence_sequence(theta: float, variance: float, tau: float, alpha: float) -> tuple[float, float]:
    """The effects `delta` the mSPRT of H0: theta = delta would not reject at `alpha`."""
    if not (math.isfinite(theta) and math.isfinite(variance)) or variance <= 0:
        return -math.inf, math.inf
    t2 = tau * tau
    spread = 2 * math.log(1 / alpha) + math.log((variance + t2) / variance)
    half = math.sqrt(variance * (variance + t2) / t2 * spread)
    return theta - half, theta + half


def compare_sequential(a: ArmEstimate, b: ArmEstimate, tau: float, alpha: float, metrics: int = 1,
                       min_devices: int = 10, previous_p: float = 1.0) -> SequentialVerdict:
    """Always-valid comparison of one metric, tested at `alpha / metrics` (Bonferroni).

    `previous_p` is the metric's always-valid p-value from the last read (1.0 at the start):
    the running minimum makes the p-value non-increasing, as the mSPRT's guarantee is about
    the first time `1 / Lambda` crosses alpha.
    """
    level = alpha / max(metrics, 1)
    enough = min(a.devices, b.devices) >= min_devices
    theta = b.value - a.value
    var = a.variance + b.variance
    p = min(previous_p, msprt_p_value(theta, var, tau)) if enough else 1.0
    lo, hi = confidence_sequence(theta, var, tau, level) if enough else (-math.inf, math.inf)
    return SequentialVerdict(theta, lo, hi, p, level, enough and p < level, a.devices, b.devices, enough)


def devices_per_arm_for(effect: float, device_sd: float, alpha: float, power: float = 0.8) -> int:
    """Devices per arm a fixed-horizon two-sided z-test at `alpha` needs to detect `effect` with
    `power`, when one device's value has standard deviation `device_sd` (the design's figure;
    the sequential test needs somewhat more on average in exchange for reading at any time)."""
    if effect == 0 or not math.isfinite(device_sd):
        return 10**9
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(2 * (z * device_sd / effect) ** 2)


def sequential_devices_per_arm(effect: float, device_sd: float, tau: float, alpha: float,
                               power: float = 0.8) -> int:
    """Devices per arm at which the mSPRT, read at that size, reaches `power` for `effect`: the
    smallest n with Phi(|effect| / sqrt(V) - z_boundary(V)) >= power, V = 2 sd^2 / n, where the
    boundary `z_boundary` is the |theta| / sqrt(V) at which 1 / Lambda reaches alpha.

    The power grows with n wherever it is near `power` (the boundary grows like sqrt(log n),
    the signal like sqrt(n)), so a doubling search then a bisection finds that n in about 40
    evaluations: the recommendation calls this on every read, and a scan from n = 2 took
    seconds for a noisy metric."""
    if effect == 0 or not math.isfinite(device_sd) or device_sd <= 0 or tau <= 0:
        return 10**9
    t2, top = tau * tau, 10**6 - 1

    def reaches(n: int) -> bool:
        v = 2 * device_sd**2 / n
        boundary = math.sqrt((2 * math.log(1 / alpha) + math.log((v + t2) / v)) * (v + t2) / t2)
        return bool(stats.norm.cdf(abs(effect) / math.sqrt(v) - boundary) >= power)

    lo, hi = 1, 2  # reaches(lo) is taken as False: n starts at 2
    while not reaches(hi):
        if hi == top:
            return 10**9
        lo, hi = hi, min(2 * hi, top)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi
