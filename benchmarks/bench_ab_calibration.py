"""Calibration and power of device-level, always-valid A/B tests under peeking.

Simulated experiments: 64 devices per arm, each with its own baseline error rate (Beta with
mean 0.05 and sd 0.03: same site, same sensor) and about 300 requests per window; the
experiment is read after each of 20 windows, as the controller does, and stops at the first
significant read. `ab_false_positive_rate` over 500 A/A experiments (goal <= 0.06 at alpha
0.05); `ab_power` with a true 2-point lift in B (0.05 -> 0.07), beside
`ab_design_devices_per_arm`, the devices per arm the sequential design predicts for 80 % power
(`sequential_devices_per_arm`; the fixed-horizon z-test's figure beside it).
Baseline, same run, same data: the per-request two-proportion z-test read after every window
(`ab_naive_false_positive_rate`, `ab_naive_power`), the test experiments used before.
"""

from __future__ import annotations

import math
import os

import numpy as np

from fleet.rollouts.experiment_stats import (
    DeviceTotals,
    compare_sequential,
    devices_per_arm_for,
    ratio_estimate,
    sequential_devices_per_arm,
)
from fleet.rollouts.experiments import two_proportion_z

NAME = "ab_calibration"
DESCRIPTION = "A/A false positives and power: device-level always-valid tests vs per-request z, peeking"
DEVICES = 64  # about what the sequential design asks for 80 % power (see the metrics)
WINDOWS = 20
REQUESTS = 300
BASE, SD, LIFT, ALPHA = 0.05, 0.03, 0.02, 0.05


def _rates(rng: np.random.Generator, mean: float, n: int) -> np.ndarray:
    k = mean * (1 - mean) / SD**2 - 1  # Beta(a, b) with this mean and sd
    return rng.beta(mean * k, (1 - mean) * k, n)


def _experiment(rng: np.random.Generator, lift: float) -> tuple[bool, bool]:
    """(device-level test rejected at some read, per-request test rejected at some read)."""
    ra, rb = _rates(rng, BASE, DEVICES), np.clip(_rates(rng, BASE, DEVICES) + lift, 0, 1)
    ya, xa = np.zeros(DEVICES), np.zeros(DEVICES)
    yb, xb = np.zeros(DEVICES), np.zeros(DEVICES)
    p_prev, mine, naive = 1.0, False, False
    for _ in range(WINDOWS):
        na, nb = rng.poisson(REQUESTS, DEVICES), rng.poisson(REQUESTS, DEVICES)
        xa += na
        xb += nb
        ya += rng.binomial(na, ra)
        yb += rng.binomial(nb, rb)
        a = ratio_estimate([DeviceTotals(e, t) for e, t in zip(ya, xa, strict=True)])
        b = ratio_estimate([DeviceTotals(e, t) for e, t in zip(yb, xb, strict=True)])
        v = compare_sequential(a, b, tau=LIFT, alpha=ALPHA, previous_p=p_prev)
        p_prev = v.p_value
        mine = mine or v.significant
        z_p = two_proportion_z(int(ya.sum()), int(xa.sum()), int(yb.sum()), int(xb.sum()))[1]
        naive = naive or z_p < ALPHA
    return mine, naive


def run() -> dict[str, float]:
    n = int(os.environ.get("EDGEFLEET_BENCH_EXPERIMENTS", "500"))
    rng = np.random.default_rng(7)
    aa = [_experiment(rng, 0.0) for _ in range(n)]
    ab = [_experiment(rng, LIFT) for _ in range(n)]
    # One device's error rate over a whole experiment: its own rate's spread plus binomial noise.
    device_sd = math.sqrt(SD**2 + BASE * (1 - BASE) / (REQUESTS * WINDOWS))
    return {
        "ab_experiments": float(n),
        "ab_false_positive_rate": sum(m for m, _ in aa) / n,
        "ab_naive_false_positive_rate": sum(z for _, z in aa) / n,
        "ab_power": sum(m for m, _ in ab) / n,
        "ab_naive_power": sum(z for _, z in ab) / n,
        "ab_devices_per_arm": float(DEVICES),
        "ab_design_devices_per_arm": float(sequential_devices_per_arm(LIFT, device_sd, LIFT, ALPHA)),
        "ab_fixed_horizon_devices_per_arm": float(devices_per_arm_for(LIFT, device_sd, ALPHA)),
    }
