"""A version's accuracy per cohort and window, realised (from labels) beside estimated (CBPE).

The same figures `GET /v1/telemetry/performance?per_window=true` answers
(`fleet.telemetry.performance.summarize` over each stored window), shaped for the version
page's line chart (`fleet.dashboard.charts.line_chart`): per cohort one solid line of realised
accuracy (windows with labels) and one dashed line of the estimate (windows whose bundle ships
a calibration map). Bounded: the newest `MAX_WINDOWS` windows of the last `SPAN_S`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.contract.telemetry import TelemetryReport
from fleet.api.telemetry import TelemetryContext
from fleet.dashboard.charts import LineChart, line_chart
from fleet.telemetry.performance import summarize

SPAN_S = 7 * 24 * 3600.0
MAX_WINDOWS = 2000


@dataclass(frozen=True)
class AccuracyRow:
    """The latest window's figures of one cohort (the table under the chart)."""

    cohort: str
    window_start: float
    labelled: int
    accuracy: float | None
    estimated: float | None
    windows: int


@dataclass(frozen=True)
class AccuracyView:
    chart: LineChart | None
    rows: list[AccuracyRow]


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%m-%d %H:%M:%S")


def accuracy_view(ctx: TelemetryContext, model: str, version: str, now: float | None = None) -> AccuracyView:
    """The chart and the latest figures per cohort (no chart without any accuracy figure)."""
    since = (time.time() if now is None else now) - SPAN_S
    windows = ctx.telemetry.windows(model, version, None, since, None)[-MAX_WINDOWS:]
    profile = ctx.profiles(model, version)
    realised: dict[str, list[tuple[float, float]]] = {}
    estimated: dict[str, list[tuple[float, float]]] = {}
    latest: dict[str, AccuracyRow] = {}
    for w in windows:
        report = w["report"]
        assert isinstance(report, TelemetryReport)
        cohort, start = str(w["cohort"]), float(str(w["window_start"]))
        summary = summarize(report.performance, profile)
        if summary is None:
            continue
        if summary.accuracy is not None and summary.labelled and math.isfinite(summary.accuracy):
            realised.setdefault(cohort, []).append((start, summary.accuracy))
        if summary.estimated_accuracy is not None and math.isfinite(summary.estimated_accuracy):
            estimated.setdefault(cohort, []).append((start, summary.estimated_accuracy))
        count = latest[cohort].windows + 1 if cohort in latest else 1
        latest[cohort] = AccuracyRow(cohort, start, summary.labelled, summary.accuracy,
                                     summary.estimated_accuracy, count)
    series = [(f"realised ({c})", False, pts) for c, pts in sorted(realised.items())]
    series += [(f"estimated ({c})", True, pts) for c, pts in sorted(estimated.items())]
    chart = line_chart(series, _clock) if series else None
    return AccuracyView(chart, [latest[c] for c in sorted(latest)])
