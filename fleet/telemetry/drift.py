"""Drift statistics over binned counts: reference profile vs merged device sketches.

The default decision rule (`method="auto"`) is a test with a false-alarm budget: the operator
says how many windows of one (model, version, cohort) should pass on average between false
alarms (`windows_per_false_alarm`); each window tests every feature and output, so each
column is tested at `alpha = 1 / (windows_per_false_alarm x columns)` (Bonferroni: the
family-wise rate per window is at most 1 / windows_per_false_alarm, whatever the correlation
between columns). Numeric columns use the two-sample KS statistic at the profile's edges,
which is a lower bound of the raw-data KS (the sketch's own error can only make the test
more conservative), against the exact null distribution (scipy `kstwo`, effective size
n m / (n + m)): its sensitivity grows with the sample (the critical D shrinks like
1 / sqrt(n_eff)) with no switch of method. An effect-size floor (`min_effect_ks`, on the KS
lower bound) keeps a huge window from alarming on a negligible shift; the effect sizes (KS,
Wasserstein / std) are reported beside every verdict. Categorical columns use chi-square at
the same alpha with a Jensen-Shannon floor. The minimum window follows from the budget: the
rows needed before a KS effect of `detectable_ks` could reach significance at that alpha
(`min_rows_for_budget`). Reference: Bonferroni (Dunn 1961); the KS null distribution (Simard
& L'Ecuyer 2011, as in scipy.stats.kstwo). Assumption: rows within a window are exchangeable
with the reference under no drift; strongly autocorrelated streams alarm more often.

The rules below are also available by name (`method=`):

- `"evidently"`: Evidently's defaults, the rule before the budget (kept for comparison).
  Pure functions over counts. Both sides are binned by the same edges (the reference profile's),
so every statistic is either exact on those bins (PSI, Jensen-Shannon, chi-square) or comes
with a bound on what binning can hide (KS, Wasserstein), and decisions use the bound so that
undrifted data does not alarm:

- Numeric, small samples (min(n_ref, n_cur) <= `small_sample`): two-sample KS on the CDFs at
  the shared edges. That D is a lower bound of the raw-data D (the upper bound adds the
  largest within-bin CDF change), so its p-value (scipy `kstwo`) is conservative.
- Numeric, large samples: Wasserstein-1 over the reference std, with CDFs linear inside each
  bin. Drift when the estimate exceeds the threshold plus its binning error bound
  (sum of bin width x largest within-bin mass) plus a sampling allowance
  (`wasserstein_sampling_q * sqrt(1/n + 1/m) * int sqrt(F(1-F)) dx / std`).
- PSI on request (`method="psi"`), exact on the bins, Evidently's zero floor.
- Categorical: chi-square test for small samples, Jensen-Shannon distance (natural log, as
  Evidently) otherwise, widened by its null quantile `sqrt(chi2_q(k-1) / (8 n_eff))`.
- Dataset drift when at least `dataset_drift_share` of the features drift.

Evidently's defaults are the baseline (see docs/telemetry.md): KS p < 0.05 for n <= 1000,
else Wasserstein/std >= 0.1; JS >= 0.1; PSI >= 0.1; chi-square p < 0.05; share 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from scipy import stats
from scipy.spatial import distance

from agent.contract.manifest import FeatureProfile, ReferenceProfile
from agent.contract.telemetry import CategoricalSketch, FeatureSketch, NumericSketch, TelemetryReport
from fleet.errors import FleetInputError

Method = Literal["auto", "budget", "evidently", "ks", "wasserstein", "psi"]
PSI_FLOOR = 1e-4  # Evidently's `get_binned_data` floor for empty bins


@dataclass(frozen=True)
class DriftThresholds:
    """Decision thresholds (Evidently's defaults) and the allowances that widen them."""

    small_sample: int = 1000
    ks_p_value: float = 0.05
    wasserstein: float = 0.1
    psi: float = 0.1
    jensen_shannon: float = 0.1
    chi2_p_value: float = 0.05
    dataset_drift_share: float = 0.5
    wasserstein_sampling_q: float = 2.5
    js_null_quantile: float = 0.999
    min_samples: int = 30
    # The false-alarm budget of the default rule (see the module docstring).
    windows_per_false_alarm: float = 1000.0
    min_effect_ks: float = 0.02
    min_effect_js: float = 0.01
    detectable_ks: float = 0.25

    def column_alpha(self, columns: int) -> float:
        """The per-column significance level that keeps one window's false-alarm rate at most
        1 / windows_per_false_alarm over `columns` tests (Bonferroni)."""
        return 1.0 / (max(self.windows_per_false_alarm, 1.0) * max(columns, 1))


def min_rows_for_budget(t: DriftThresholds, columns: int) -> int:
    """Rows a window needs before a KS effect of `t.detectable_ks` could be significant at the
    budget's per-column alpha (the asymptotic bound D > sqrt(-ln(alpha / 2) / (2 n_eff)))."""
    alpha = t.column_alpha(columns)
    return max(t.min_samples, math.ceil(-math.log(alpha / 2) / (2 * t.detectable_ks**2)))


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's verdict: the deciding statistic, its effective (widened) threshold, its
    binning error bound, and every other statistic computed on the way (`stats`)."""

    name: str
    kind: str
    method: str
    statistic: float
    threshold: float
    drifted: bool
    n_reference: int
    n_current: int
    p_value: float | None = None
    error: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DriftReport:
    """Per-feature and per-output drift plus the dataset-level verdicts."""

    features: list[FeatureDrift]
    outputs: list[FeatureDrift]
    drifted_share: float
    dataset_drift: bool
    prediction_drift: bool


# ---------------------------------------------------------------------------- numeric
def _psi(p: np.ndarray, q: np.ndarray) -> float:
    p = np.where(p == 0, PSI_FLOOR, p)
    q = np.where(q == 0, PSI_FLOOR, q)
    return float(np.sum((p - q) * np.log(p / q)))


def _linear_abs_integral(d0: np.ndarray, d1: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Integral of |d| over each bin when d goes linearly from d0 to d1."""
    a0, a1 = np.abs(d0), np.abs(d1)
    same = d0 * d1 >= 0
    denom = np.where(a0 + a1 > 0, a0 + a1, 1.0)
    return width * np.where(same, (a0 + a1) / 2, (d0 * d0 + d1 * d1) / (2 * denom))


def _wasserstein_lower(diff: np.ndarray, width: np.ndarray, within: np.ndarray) -> float:
    """A lower bound of the integral of |F_a - F_b| from binned CDFs: inside a bin the true
    difference stays within the bin's larger mass of the values at its edges."""
    d0, d1 = diff[:-1], diff[1:]
    floor = np.where(d0 * d1 > 0, np.minimum(np.abs(d0), np.abs(d1)) - within, 0.0)
    return float((width * np.maximum(floor, 0.0)).sum())


def numeric_drift(
    name: str,
    edges: np.ndarray,
    ref_counts: np.ndarray,
    cur_counts: np.ndarray,
    ref_std: float,
    lo: float,
    hi: float,
    thresholds: DriftThresholds | None = None,
    method: Method = "auto",
    mean_delta: float | None = None,
    alpha: float | None = None,
) -> FeatureDrift:
    """Drift of one numeric feature. Both count arrays are `[underflow, bins.., overflow]`
    over `edges` (len(edges) + 1); `lo`/`hi` bound the observed values (for the outer bins);
    `ref_std` normalises Wasserstein; `mean_delta` (exact, from the sums) tightens its lower
    bound, since W1 >= |mean difference|. `alpha` is the budget rule's per-column level (default:
    the budget over one column). Raises `FleetInputError` on inconsistent sizes."""
    t = thresholds or DriftThresholds()
    edges = np.asarray(edges, dtype=np.float64)
    a = np.asarray(ref_counts, dtype=np.float64)
    b = np.asarray(cur_counts, dtype=np.float64)
    if a.shape != b.shape or a.size != edges.size + 1:
        raise FleetInputError(f"feature {name!r}: counts do not match {edges.size} edges")
    n, m = float(a.sum()), float(b.sum())
    if n < 1 or m < t.min_samples:
        return FeatureDrift(name, "numeric", "insufficient", math.nan, math.nan, False, int(n), int(m))
    pa, pb = a / n, b / m
    points = np.concatenate([[min(lo, edges[0])], edges, [max(hi, edges[-1])]])
    fa = np.concatenate([[0.0], np.cumsum(pa)])
    fb = np.concatenate([[0.0], np.cumsum(pb)])
    diff = fa - fb
    width = np.diff(points)
    within = np.maximum(pa, pb)
    noise = 1 / n + 1 / m
    # KS: D at the edges is a lower bound; inside the bins around the maximum the two ECDFs
    # wander like a Brownian bridge of variance p * (1/n + 1/m), whose mean excursion is
    # sqrt(pi / 8) sigma: the estimate adds it, the p-value uses the lower bound.
    at = int(np.argmax(np.abs(diff)))
    ks_lo = float(abs(diff[at]))
    pooled_mass = (a + b) / (n + m)
    near = max(pooled_mass[at - 1] if at > 0 else 0.0, pooled_mass[at] if at < pooled_mass.size else 0.0)
    ks = min(1.0, ks_lo + math.sqrt(math.pi / 8 * near * noise)) if ks_lo > 0 else 0.0
    ks_err = float(within.max())
    en = n * m / (n + m)
    ks_p = float(stats.kstwo.sf(ks_lo, max(1, round(en))))
    std = max(ref_std, 1e-3)  # Evidently's floor for the normaliser
    w = float(_linear_abs_integral(diff[:-1], diff[1:], width).sum()) / std
    w_err = float((width * within).sum()) / std
    w_lower = max(w - w_err, _wasserstein_lower(diff, width, within) / std,
                  abs(mean_delta) / std if mean_delta is not None and math.isfinite(mean_delta) else 0.0)
    pooled = np.clip((fa * n + fb * m) / (n + m), 0.0, 1.0)
    root = np.sqrt(pooled * (1 - pooled))
    spread = float(_linear_abs_integral(root[:-1], root[1:], width).sum())
    w_sampling = t.wasserstein_sampling_q * math.sqrt(noise) * spread / std
    psi = _psi(pa, pb)
    all_stats = {"ks": ks, "ks_lower": ks_lo, "ks_error": ks_err, "ks_p_value": ks_p,
                 "wasserstein_norm": w, "wasserstein_lower": w_lower, "wasserstein_error": w_err,
                 "wasserstein_sampling": w_sampling, "psi": psi}
    if method in ("auto", "budget"):
        a_col = alpha if alpha is not None else t.column_alpha(1)
        # The tested statistic is the lower bound at the edges, so the verdict is
        # `statistic > threshold` with the effect floor folded into the threshold.
        critical = max(float(stats.kstwo.isf(a_col, max(1, round(en)))), t.min_effect_ks)
        all_stats["ks_critical"] = critical
        return FeatureDrift(name, "numeric", "ks_budget", ks_lo, critical, ks_lo > critical, int(n), int(m),
                            p_value=ks_p, error=ks_err, stats=all_stats)
    chosen = method if method != "evidently" else ("ks" if min(n, m) <= t.small_sample else "wasserstein")
    if chosen == "ks":
        return FeatureDrift(name, "numeric", "ks", ks, t.ks_p_value, ks_p < t.ks_p_value, int(n), int(m),
                            p_value=ks_p, error=ks_err, stats=all_stats)
    if chosen == "wasserstein":
        # Widened: the lower bound must clear the threshold plus the sampling allowance,
        # i.e. the estimate must clear it by its own binning error.
        limit = t.wasserstein + w_sampling + (w - w_lower)
        return FeatureDrift(name, "numeric", "wasserstein", w, limit, w > limit, int(n), int(m),
                            error=w - w_lower, stats=all_stats)
    return FeatureDrift(name, "numeric", "psi", psi, t.psi, psi >= t.psi, int(n), int(m), stats=all_stats)


# ---------------------------------------------------------------------------- categorical
def categorical_drift(
    name: str, ref_counts: np.ndarray, cur_counts: np.ndarray, thresholds: DriftThresholds | None = None,
    method: Method = "auto", alpha: float | None = None,
) -> FeatureDrift:
    """Drift of one categorical feature over the same categories (vocabulary + unseen): the
    budget rule (chi-square at `alpha` with a Jensen-Shannon floor) by default, Evidently's for
    any other method. Raises `FleetInputError` on inconsistent sizes."""
    t = thresholds or DriftThresholds()
    a = np.asarray(ref_counts, dtype=np.float64)
    b = np.asarray(cur_counts, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise FleetInputError(f"feature {name!r}: category counts differ in size")
    n, m = float(a.sum()), float(b.sum())
    if n < 1 or m < t.min_samples:
        return FeatureDrift(name, "categorical", "insufficient", math.nan, math.nan, False, int(n), int(m))
    used = (a + b) > 0
    k = int(used.sum())
    js = float(distance.jensenshannon(a[used] / n, b[used] / m)) if k > 1 else 0.0
    n_eff = n * m / (n + m)
    js_null = math.sqrt(stats.chi2.ppf(t.js_null_quantile, max(k - 1, 1)) / (8 * n_eff))
    if k > 1:
        chi2, chi_p = stats.chi2_contingency(np.vstack([a[used], b[used]]))[:2]
    else:
        chi2, chi_p = 0.0, 1.0
    all_stats = {"jensen_shannon": js, "js_null": js_null, "chi2": float(chi2), "chi2_p_value": float(chi_p),
                 "psi": _psi(a / n, b / m)}
    if method in ("auto", "budget"):
        a_col = alpha if alpha is not None else t.column_alpha(1)
        drifted = chi_p < a_col and js >= t.min_effect_js
        return FeatureDrift(name, "categorical", "chisquare_budget", float(chi2), a_col, drifted,
                            int(n), int(m), p_value=float(chi_p), stats=all_stats)
    if min(n, m) <= t.small_sample:
        return FeatureDrift(name, "categorical", "chisquare", float(chi2), t.chi2_p_value,
                            chi_p < t.chi2_p_value, int(n), int(m), p_value=float(chi_p), stats=all_stats)
    limit = t.jensen_shannon + js_null
    return FeatureDrift(name, "categorical", "jensenshannon", js, limit, js > limit, int(n), int(m),
                        stats=all_stats)


# ---------------------------------------------------------------------------- profiles and reports
def _reference_counts(p: FeatureProfile) -> np.ndarray:
    counts = np.asarray(p.reference_counts, dtype=np.int64)
    if p.kind == "numeric":
        if counts.size != len(p.edges) - 1:
            raise FleetInputError(f"profile {p.name!r}: reference_counts must have len(edges) - 1 entries")
        return np.concatenate([[0], counts, [0]])
    if counts.size != len(p.vocabulary) + 1:
        raise FleetInputError(f"profile {p.name!r}: reference_counts must have len(vocabulary) + 1 entries")
    return counts


def sketch_drift(
    p: FeatureProfile, s: FeatureSketch, thresholds: DriftThresholds | None = None, method: Method = "auto",
    alpha: float | None = None,
) -> FeatureDrift:
    """Drift of one merged sketch against the profile's reference counts.
    Raises `FleetInputError` when the sketch was binned by another profile."""
    ref = _reference_counts(p)
    if s.counts.size != ref.size:
        raise FleetInputError(f"feature {p.name!r}: sketch has {s.counts.size} bins, profile {ref.size}")
    if p.kind == "categorical":
        if not isinstance(s, CategoricalSketch):
            raise FleetInputError(f"feature {p.name!r}: expected a categorical sketch")
        return categorical_drift(p.name, ref, s.counts, thresholds, method, alpha)
    if not isinstance(s, NumericSketch):
        raise FleetInputError(f"feature {p.name!r}: expected a numeric sketch")
    edges = np.asarray(p.edges)
    lo = s.min if math.isfinite(s.min) else edges[0]
    hi = s.max if math.isfinite(s.max) else edges[-1]
    n = s.n  # finite values: all of them are in `sum`
    delta = s.sum / n - p.mean if n and p.mean is not None else None
    return numeric_drift(p.name, edges, ref, s.counts, p.std or 0.0, lo, hi, thresholds, method, delta, alpha)


def _verdict(features: list[FeatureDrift], outputs: list[FeatureDrift], t: DriftThresholds) -> DriftReport:
    decided = [f for f in features if f.method != "insufficient"]
    share = sum(f.drifted for f in decided) / len(decided) if decided else 0.0
    dataset = bool(decided) and share >= t.dataset_drift_share
    return DriftReport(features, outputs, share, dataset, any(o.drifted for o in outputs))


def report_drift(
    profile: ReferenceProfile,
    report: TelemetryReport,
    thresholds: DriftThresholds | None = None,
    method: Method = "auto",
) -> DriftReport:
    """Data drift (inputs) and prediction drift (outputs) of a merged report against the
    reference profile. Under the budget rule every column is tested at the window's Bonferroni
    level and a window below `min_rows_for_budget` rows is "insufficient". Raises
    `FleetInputError` when the report does not match the profile."""
    columns = len(profile.features) + len(profile.outputs)
    t, alpha = _budgeted(thresholds or DriftThresholds(), method, columns)
    if len(report.features) != len(profile.features) or len(report.outputs) != len(profile.outputs):
        raise FleetInputError("report and profile have different features or outputs")
    feats = [sketch_drift(p, s, t, method, alpha)
             for p, s in zip(profile.features, report.features, strict=True)]
    outs = [sketch_drift(p, s, t, method, alpha)
            for p, s in zip(profile.outputs, report.outputs, strict=True)]
    return _verdict(feats, outs, t)


def _budgeted(t: DriftThresholds, method: Method, columns: int) -> tuple[DriftThresholds, float | None]:
    """The thresholds and per-column alpha one window is judged with under `method`."""
    if method not in ("auto", "budget"):
        return t, None
    return replace(t, min_samples=min_rows_for_budget(t, columns)), t.column_alpha(columns)


def _pair_drift(
    p: FeatureProfile, a: FeatureSketch, b: FeatureSketch, t: DriftThresholds, method: Method,
    alpha: float | None,
) -> FeatureDrift:
    if a.counts.shape != b.counts.shape or type(a) is not type(b):
        raise FleetInputError(f"feature {p.name!r}: the two sketches are binned differently")
    if isinstance(a, NumericSketch) and isinstance(b, NumericSketch):
        n = a.n
        std = math.sqrt(max(a.sum_sq / n - (a.sum / n) ** 2, 0.0)) if n else 0.0
        lo, hi = min(a.min, b.min, p.edges[0]), max(a.max, b.max, p.edges[-1])
        delta = b.sum / b.n - a.sum / n if n and b.n else None
        return numeric_drift(p.name, np.asarray(p.edges), a.counts, b.counts, std or (p.std or 0.0), lo, hi,
                             t, method, delta, alpha)
    return categorical_drift(p.name, a.counts, b.counts, t, method, alpha)


def compare_reports(
    profile: ReferenceProfile,
    baseline: TelemetryReport,
    candidate: TelemetryReport,
    thresholds: DriftThresholds | None = None,
    method: Method = "auto",
    compare_outputs: bool = True,
) -> DriftReport:
    """Compare two merged sketches binned by the same profile: two model versions on the same
    traffic, or two A/B arms. `baseline` plays the reference (its std normalises Wasserstein).
    Outputs are compared only when both versions share the output profile
    (`compare_outputs`). Raises `FleetInputError` on mismatched binning."""
    columns = len(profile.features) + (len(profile.outputs) if compare_outputs else 0)
    t, alpha = _budgeted(thresholds or DriftThresholds(), method, columns)
    if len(baseline.features) != len(profile.features) or len(candidate.features) != len(profile.features):
        raise FleetInputError("reports and profile have different features")
    feats = [
        _pair_drift(p, a, b, t, method, alpha)
        for p, a, b in zip(profile.features, baseline.features, candidate.features, strict=True)
    ]
    outs: list[FeatureDrift] = []
    if compare_outputs and len(baseline.outputs) == len(candidate.outputs) == len(profile.outputs):
        outs = [
            _pair_drift(p, a, b, t, method, alpha)
            for p, a, b in zip(profile.outputs, baseline.outputs, candidate.outputs, strict=True)
        ]
    return _verdict(feats, outs, t)
