"""View models of the drift page: a heat map of drift per feature over time windows, the
reference histogram beside the live one for a chosen feature, and the alerts.

The data is what `GET /v1/telemetry/windows` and `GET /v1/drift` serve: the merged windows of
one (model, version, cohort) from the drift monitor's `TelemetryStore` (`telemetry_context`),
each judged against the version's reference profile by `report_drift`, the rule the drift
monitor and the alerts use. A closed window never changes, so its verdict is cached (keyed
by its start and report count, which moves while the window still fills).

A cell's *severity* makes methods comparable on one colour scale: 1.0 is the decision
threshold. For statistics compared with a critical value (KS at the budget's level,
Wasserstein, PSI, Jensen-Shannon) it is statistic / threshold; for tests decided on a
p-value (chi-square, Evidently's KS) it is log(p) / log(alpha), so p = alpha gives 1 and
each further factor of alpha adds 1. The drifted verdict itself is drawn as an outline.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlencode

from agent.contract.manifest import FeatureProfile, ReferenceProfile
from agent.contract.telemetry import CategoricalSketch, MessageError, TelemetryReport, merge_reports
from fleet.api.telemetry import TelemetryContext
from fleet.dashboard.charts import HeatValue, Histogram, heat_map, histogram_pair
from fleet.errors import FleetInputError
from fleet.telemetry.drift import DriftReport, FeatureDrift, report_drift

HEAT_WINDOWS = 24
P_LEVEL_METHODS = ("chisquare_budget", "chisquare", "ks")
_CACHE_MAX = 20_000


class VerdictCache:
    """Verdicts of windows by (model, version, cohort, start, reports), bounded (FIFO)."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple[Any, ...], DriftReport] = OrderedDict()
        self._lock = threading.Lock()

    def verdict(self, key: tuple[Any, ...], profile: ReferenceProfile, report: TelemetryReport,
                ctx: TelemetryContext) -> DriftReport:
        """Raises FleetInputError when the window does not match the profile."""
        with self._lock:
            hit = self._items.get(key)
        if hit is not None:
            return hit
        verdict = report_drift(profile, report, ctx.thresholds)
        with self._lock:
            self._items[key] = verdict
            while len(self._items) > _CACHE_MAX:
                self._items.popitem(last=False)
        return verdict


def severity(f: FeatureDrift) -> float | None:
    """The feature's evidence on the heat map's scale (module docstring); None when untested."""
    if f.method == "insufficient" or not math.isfinite(f.statistic):
        return None
    if f.method in P_LEVEL_METHODS:
        if f.p_value is None or not 0 < f.threshold < 1:
            return None
        return math.log(max(f.p_value, 1e-300)) / math.log(f.threshold)
    if not f.threshold or not math.isfinite(f.threshold):
        return None
    return f.statistic / f.threshold


def _title(f: FeatureDrift, when: str) -> str:
    if f.method == "insufficient":
        return f"{f.name} @ {when}: not tested ({f.n_current} rows, too few)"
    p = f" p={f.p_value:.3g}" if f.p_value is not None else ""
    verdict = "DRIFTED" if f.drifted else "ok"
    return (f"{f.name} @ {when}: {verdict} ({f.method} {f.statistic:.4g} vs {f.threshold:.4g}{p}; "
            f"{f.n_current} rows vs {f.n_reference} reference)")


def _bin_labels(p: FeatureProfile) -> list[str]:
    if p.kind == "categorical":
        return [*p.vocabulary, "(unseen)"]
    e = p.edges  # a bin is named by its lower edge (the tooltip says the same)
    return [f"< {e[0]:.3g}", *(f"{a:.3g}" for a, _ in itertools.pairwise(e)), f"≥ {e[-1]:.3g}"]


def _reference_counts(p: FeatureProfile) -> list[float]:
    counts = [float(c) for c in p.reference_counts]
    return [0.0, *counts, 0.0] if p.kind == "numeric" else counts


def _histogram(profile: ReferenceProfile, merged: TelemetryReport, name: str) -> tuple[Histogram, str] | None:
    for prof, sketch, kind in [*((p, s, "input") for p, s in zip(profile.features, merged.features,
                                                                   strict=False)),
                               *((p, s, "output") for p, s in zip(profile.outputs, merged.outputs,
                                                                    strict=False))]:
        label = prof.name if kind == "input" else f"output:{prof.name}"
        if label != name:
            continue
        ref = _reference_counts(prof)
        live = [float(c) for c in sketch.counts]
        labels = _bin_labels(prof)
        if len(ref) != len(live) or len(labels) != len(live):
            return None
        note = "categories" if isinstance(sketch, CategoricalSketch) else "bins of the reference profile"
        return histogram_pair(labels, ref, live), note
    return None


def heat_view(ctx: TelemetryContext, cache: VerdictCache, model: str, version: str, cohort: str,
              feature: str | None, n_windows: int = HEAT_WINDOWS,
              now: float | None = None) -> dict[str, Any]:
    """The heat map, the chosen feature's histograms, and what is missing (`problems`)."""
    out: dict[str, Any] = {"heat": None, "histogram": None, "feature": feature, "windows": [], "problems": []}
    profile = ctx.profiles(model, version)
    if profile is None:
        out["problems"].append(f"No reference profile for {model} {version}: its bundle is not in the "
                               "repository, so drift cannot be computed.")
        return out
    window_s = ctx.telemetry.config.window_s
    since = (now if now is not None else time.time()) - n_windows * window_s
    windows = ctx.telemetry.windows(model, version, cohort, since=since) or \
        ctx.telemetry.windows(model, version, cohort)[-n_windows:]
    if not windows:
        out["problems"].append(f"No telemetry windows for {model} {version} in cohort {cohort!r}.")
        return out
    values: dict[tuple[str, str], HeatValue] = {}
    cols: list[str] = []
    names: list[str] = []
    latest: DriftReport | None = None
    merged: TelemetryReport | None = None
    for w in windows:
        report = w["report"]
        assert isinstance(report, TelemetryReport)
        start = float(w["window_start"])  # type: ignore[arg-type]
        col = time.strftime("%H:%M:%S", time.gmtime(start))
        try:
            verdict = cache.verdict((model, version, cohort, start, w["reports"]), profile, report, ctx)
            merged = report if merged is None else merge_reports(merged, report)
        except (FleetInputError, MessageError) as exc:
            out["problems"].append(f"Window {col} cannot be judged: {exc}")
            continue
        cols.append(col)
        latest = verdict
        for f in verdict.features:
            values[(f.name, col)] = HeatValue(severity(f), f.drifted, _title(f, col))
        for o in verdict.outputs:
            values[(f"output:{o.name}", col)] = HeatValue(severity(o), o.drifted, _title(o, col))
        if not names:
            names = [f.name for f in verdict.features] + [f"output:{o.name}" for o in verdict.outputs]
        out["windows"].append({"start": start, "col": col, "reports": w["reports"],
                               "devices": w["device_count"], "drifted_share": verdict.drifted_share,
                               "dataset_drift": verdict.dataset_drift})
    if latest is None or merged is None:
        return out
    if feature not in names:
        drifted = [f for f in [*latest.features, *latest.outputs] if f.drifted]
        feature = (drifted[0].name if drifted else names[0]) if names else None
        if feature is not None and feature not in names:
            feature = f"output:{feature}"
    out["feature"] = feature
    base = {"model": model, "version": version, "cohort": cohort}
    links = [(n, "/ui/drift?" + urlencode({**base, "feature": n})) for n in names]
    out["heat"] = heat_map(links, cols, values)
    out["window_s"] = window_s
    if feature is not None:
        hist = _histogram(profile, merged, feature)
        if hist is None:
            out["problems"].append(f"{feature}: reference and live bins differ; no histogram.")
        else:
            out["histogram"], out["histogram_note"] = hist
    return out
