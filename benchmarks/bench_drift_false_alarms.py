"""False alarms and power of the default drift rule (the false-alarm budget) vs an exact test.

Reference: 20,000 rows of 36 columns of mixed shapes (normal, Student t with 3 dof,
lognormal, uniform); windows of 500, 2,000 and 10,000 rows through the real sketch path
(profile -> device sketch -> `report_drift` with the defaults). Baseline in the same run: the
exact two-sample KS test on the raw values of the same windows at the same per-column alpha
(the budget's Bonferroni level), so both rules spend the same false-alarm budget.

Metrics:
- `drift_windows_per_false_alarm` (all sizes) and `drift_windows_per_false_alarm_<rows>`:
  undrifted windows per window with any alarm
  (goal: at least the configured `windows_per_false_alarm`, 1,000 by default; with
  `EDGEFLEET_BENCH_WINDOWS` windows and no alarm it is reported as "at least" that many);
- `drift_power_<rows>` / `drift_exact_power_<rows>` / `drift_power_ratio_<rows>`: share of
  windows with a 0.1 sd location shift in one feature where that feature alarms
  (goal: ratio >= 0.8);
- `drift_detection_windows` / `drift_exact_detection_windows`: mean windows (2,000 rows each)
  until the first alarm when the shift grows by 0.01 sd per window.
`EDGEFLEET_BENCH_WINDOWS` (default 1000) sets the undrifted windows per size.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import stats

from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry import TelemetryReport
from agent.telemetry import TelemetrySketch
from fleet.registry.profile import compute_reference_profile
from fleet.telemetry.drift import DriftThresholds, report_drift

NAME = "drift_false_alarms"
DESCRIPTION = "undrifted windows per false alarm, power for a 0.1 sd shift, detection delay (vs exact KS)"
COLUMNS = 36
REFERENCE_ROWS = 20_000
SIZES = (500, 2_000, 10_000)
SHAPES = ("normal", "student_t", "lognormal", "uniform")


def _column(rng: np.random.Generator, j: int, n: int, shift_sd: float = 0.0) -> np.ndarray:
    shape = SHAPES[j % len(SHAPES)]
    if shape == "normal":
        return rng.normal(shift_sd, 1.0, n)
    if shape == "student_t":
        return rng.standard_t(3, n) + shift_sd * np.sqrt(3.0)
    if shape == "lognormal":
        return rng.lognormal(0.0, 1.0, n) + shift_sd * float(np.sqrt((np.e - 1) * np.e))
    return rng.uniform(0.0, 1.0, n) + shift_sd * float(np.sqrt(1 / 12))


def _window(rng: np.random.Generator, n: int, shifted: int | None = None,
            shift_sd: float = 0.0) -> np.ndarray:
    return np.column_stack([_column(rng, j, n, shift_sd if j == shifted else 0.0) for j in range(COLUMNS)])


def _fold(profile: ReferenceProfile, x: np.ndarray) -> TelemetryReport:
    sk = TelemetrySketch(profile, "bench", "m", "1.0.0", resource_probe=lambda: (0, 0.0, 0.0))
    sk.update(x, None, 0.001)
    return sk.snapshot_and_reset()


class ExactKS:
    """The exact two-sample KS test on raw values at a fixed alpha (same run, same windows)."""

    def __init__(self, reference: np.ndarray, alpha: float) -> None:
        self.sorted = np.sort(reference, axis=0)
        self.alpha = alpha
        self._critical: dict[int, float] = {}

    def drifted(self, window: np.ndarray, column: int) -> bool:
        ref = self.sorted[:, column]
        cur = np.sort(window[:, column])
        n, m = ref.size, cur.size
        both = np.concatenate([ref, cur])
        d = float(np.max(np.abs(np.searchsorted(ref, both, side="right") / n
                                - np.searchsorted(cur, both, side="right") / m)))
        en = round(n * m / (n + m))
        if en not in self._critical:
            self._critical[en] = float(stats.kstwo.isf(self.alpha, en))
        return d > self._critical[en]


def run() -> dict[str, float]:
    windows = int(os.environ.get("EDGEFLEET_BENCH_WINDOWS", "1000"))
    rng = np.random.default_rng(2026)
    reference = _window(rng, REFERENCE_ROWS)
    profile = compute_reference_profile(reference, [f"f{j}" for j in range(COLUMNS)])
    t = DriftThresholds()
    alpha = t.column_alpha(COLUMNS)
    exact = ExactKS(reference, alpha)
    out: dict[str, float] = {"drift_budget_windows_per_false_alarm": t.windows_per_false_alarm,
                             "drift_column_alpha": alpha}
    for rows in SIZES:
        alarms = exact_alarms = 0
        for _ in range(windows):
            x = _window(rng, rows)
            alarms += bool(any(f.drifted for f in report_drift(profile, _fold(profile, x)).features))
            exact_alarms += any(exact.drifted(x, j) for j in range(COLUMNS))
        out[f"drift_false_alarm_windows_{rows}"] = alarms
        out[f"drift_windows_per_false_alarm_{rows}"] = windows / alarms if alarms else float(windows)
        out[f"drift_exact_false_alarm_windows_{rows}"] = exact_alarms
    total_alarms = sum(int(out[f"drift_false_alarm_windows_{rows}"]) for rows in SIZES)
    total = windows * len(SIZES)
    out["drift_windows_per_false_alarm"] = total / total_alarms if total_alarms else float(total)
    trials = max(50, windows // 5)
    for rows in (2_000, 10_000):
        hit = exact_hit = 0
        for i in range(trials):
            j = i % COLUMNS
            x = _window(rng, rows, shifted=j, shift_sd=0.1)
            hit += report_drift(profile, _fold(profile, x)).features[j].drifted
            exact_hit += exact.drifted(x, j)
        out[f"drift_power_{rows}"] = hit / trials
        out[f"drift_exact_power_{rows}"] = exact_hit / trials
        out[f"drift_power_ratio_{rows}"] = hit / exact_hit if exact_hit else float("nan")
    delays: list[int] = []
    exact_delays: list[int] = []
    for i in range(20):
        j = i % COLUMNS
        mine = theirs = 0
        for w in range(1, 60):
            x = _window(rng, 2_000, shifted=j, shift_sd=0.01 * w)
            if not mine and report_drift(profile, _fold(profile, x)).features[j].drifted:
                mine = w
            if not theirs and exact.drifted(x, j):
                theirs = w
            if mine and theirs:
                break
        delays.append(mine or 60)
        exact_delays.append(theirs or 60)
    out["drift_detection_windows"] = float(np.mean(delays))
    out["drift_exact_detection_windows"] = float(np.mean(exact_delays))
    return out
