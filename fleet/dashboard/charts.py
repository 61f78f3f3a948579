"""Geometry and colours of the dashboard's SVG charts, drawn on the server.

Why server-side SVG rather than a charting library: the charts (a drift heat map, a
reference-versus-live histogram pair, a stacked status bar, a version's accuracy lines) are
shapes whose sizes and colours follow from numbers the server already has; drawn here they arrive in the page
itself, need no script (so the strict CSP holds and htmx can swap them like any HTML), print,
scale, carry their figures in `<title>` tooltips, and a test can read them from the DOM.
Everything below is pure arithmetic over lists; the templates (`templates/_charts.html`) only
place the shapes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Severity colour stops: 0 (no evidence) .. 1 (at the threshold) .. 2 and above (twice it).
_STOPS = ((0.0, (247, 251, 255)), (0.5, (253, 224, 168)), (1.0, (241, 105, 19)), (2.0, (127, 0, 0)))
UNKNOWN_FILL = "#d9d9d9"
STATUS_FILLS = {"succeeded": "#2ca25f", "installed": "#74c476", "probation": "#a1d99b", "assigned": "#6baed6",
                "downloading": "#9ecae1", "pending": "#d9d9d9", "failed": "#de2d26", "rolled_back": "#fb6a4a",
                "skipped": "#969696", "waiting_for_window": "#c6dbef", "held": "#fdd0a2",
                "window_missed": "#bdbdbd"}


def severity_fill(value: float | None) -> str:
    """The heat-map colour of a severity (None: not tested)."""
    if value is None or not math.isfinite(value):
        return UNKNOWN_FILL
    v = max(0.0, min(value, _STOPS[-1][0]))
    for (x0, c0), (x1, c1) in itertools.pairwise(_STOPS):
        if v <= x1:
            f = (v - x0) / (x1 - x0)
            r, g, b = (round(a + (b_ - a) * f) for a, b_ in zip(c0, c1, strict=True))
            return f"#{r:02x}{g:02x}{b:02x}"
    return "#7f0000"


@dataclass(frozen=True)
class Cell:
    x: float
    y: float
    w: float
    h: float
    fill: str
    title: str
    drifted: bool
    row: str
    col: str


@dataclass(frozen=True)
class HeatMap:
    """Rows (features), columns (windows) and one cell per tested (row, column)."""

    width: float
    height: float
    left: float
    top: float
    rows: list[tuple[float, str, str]]  # (y of the label, label, link)
    cols: list[tuple[float, str]]  # (x of the label, label)
    cells: list[Cell]
    legend: list[tuple[float, str, str]]  # (x, fill, label)


@dataclass(frozen=True)
class HeatValue:
    """One cell's figures: `severity` 1.0 is the decision threshold; `drifted` is the verdict."""

    severity: float | None
    drifted: bool
    title: str


def heat_map(rows: Sequence[tuple[str, str]], cols: Sequence[str], values: dict[tuple[str, str], HeatValue],
             cell: float = 18.0, left: float = 150.0, top: float = 70.0) -> HeatMap:
    """Lay out `rows` ((label, link)) against `cols` (labels) with one cell per known value."""
    label_every = max(1, math.ceil(len(cols) / 12))
    cells = [
        Cell(left + j * cell, top + i * cell, cell - 1, cell - 1, severity_fill(v.severity), v.title,
             v.drifted, name, col)
        for i, (name, _) in enumerate(rows) for j, col in enumerate(cols)
        if (v := values.get((name, col))) is not None
    ]
    legend = [(left + k * 72.0 - 100, severity_fill(s), label) for k, (s, label) in enumerate(
        ((0.0, "0"), (0.5, "0.5"), (1.0, "1 = limit"), (1.5, "1.5"), (2.0, "≥ 2"), (None, "not tested")))]
    return HeatMap(
        width=max(left + max(len(cols), 1) * cell + 20, left + 6 * 72.0 - 60),
        height=top + max(len(rows), 1) * cell + 50,
        left=left, top=top,
        rows=[(top + i * cell + cell * 0.7, name, link) for i, (name, link) in enumerate(rows)],
        cols=[(left + j * cell + cell / 2, col) for j, col in enumerate(cols) if j % label_every == 0],
        cells=cells, legend=legend,
    )


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    title: str


@dataclass(frozen=True)
class Histogram:
    """Reference and live shares per bin side by side (both normalised to 1)."""

    width: float
    height: float
    base: float
    reference: list[Bar]
    live: list[Bar]
    labels: list[tuple[float, str]]
    top_share: float


def histogram_pair(labels: Sequence[str], reference: Sequence[float], live: Sequence[float],
                   width: float = 640.0, height: float = 220.0) -> Histogram:
    """Bars of the two distributions over the same bins; counts are normalised here."""
    ref_total, live_total = sum(reference) or 1.0, sum(live) or 1.0
    ref_share = [r / ref_total for r in reference]
    live_share = [x / live_total for x in live]
    top_share = max([*ref_share, *live_share, 1e-9])
    n = max(len(labels), 1)
    slot = (width - 40) / n
    plot_h = height - 50
    base = 10 + plot_h

    def bars(shares: list[float], offset: float, name: str) -> list[Bar]:
        out = []
        for i, share in enumerate(shares):
            h = plot_h * share / top_share
            out.append(Bar(30 + i * slot + offset, base - h, max(slot / 2 - 1, 1), h,
                           f"{labels[i]}: {name} {share:.1%}"))
        return out

    every = max(1, math.ceil(n / 7))
    return Histogram(width, height, base, bars(ref_share, 0, "reference"), bars(live_share, slot / 2, "live"),
                     [(30 + i * slot + slot / 2, lab) for i, lab in enumerate(labels) if i % every == 0],
                     top_share)


@dataclass(frozen=True)
class Segment:
    x: float
    w: float
    fill: str
    title: str


def status_bar(counts: dict[str, int], width: float = 600.0) -> list[Segment]:
    """A stacked bar of devices per status, in lifecycle order (known statuses first)."""
    total = sum(counts.values())
    if total == 0:
        return []
    order = [s for s in STATUS_FILLS if s in counts] + sorted(s for s in counts if s not in STATUS_FILLS)
    out, x = [], 0.0
    for status in order:
        w = width * counts[status] / total
        out.append(Segment(x, w, STATUS_FILLS.get(status, "#bcbddc"), f"{status}: {counts[status]}"))
        x += w
    return out


LINE_COLOURS = ("#2171b5", "#cb181d", "#238b45", "#6a51a3", "#d94801", "#525252")


@dataclass(frozen=True)
class Line:
    name: str
    points: str  # the SVG polyline's "x,y x,y ..."
    colour: str
    dashed: bool
    marks: list[tuple[float, float, str]]  # (x, y, tooltip) per point


@dataclass(frozen=True)
class LineChart:
    """Lines over a shared x axis (seconds) and a 0..1 y axis (accuracy)."""

    width: float
    height: float
    left: float
    top: float
    bottom: float
    lines: list[Line]
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str]]


def line_chart(series: Sequence[tuple[str, bool, Sequence[tuple[float, float]]]],
               x_label: Callable[[float], str], width: float = 600.0, height: float = 220.0) -> LineChart:
    """`series`: (name, dashed, [(x, y in 0..1)]); each name's colour follows its cohort, the
    part before " (", so a cohort's realised and estimated lines share one."""
    left, top, right, bottom = 44.0, 12.0, 150.0, 28.0
    pw, ph = width - left - right, height - top - bottom
    xs = [x for _, _, pts in series for x, _ in pts]
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    span = hi - lo or 1.0
    groups: dict[str, str] = {}
    lines = []
    for name, dashed, pts in series:
        colour = groups.setdefault(name.split(" (")[-1], LINE_COLOURS[len(groups) % len(LINE_COLOURS)])
        coords = [(left + pw * (x - lo) / span, top + ph * (1 - max(0.0, min(y, 1.0)))) for x, y in pts]
        lines.append(Line(name, " ".join(f"{x:.1f},{y:.1f}" for x, y in coords), colour, dashed,
                          [(cx, cy, f"{name} {x_label(x)}: {y:.3f}") for (cx, cy), (x, y) in zip(coords, pts,
                                                                                                    strict=True)]))
    y_ticks = [(top + ph * (1 - v), f"{v:.2f}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
    x_ticks = [(left + pw * f, x_label(lo + span * f)) for f in (0.0, 0.5, 1.0)] if xs else []
    return LineChart(width, height, left, top, top + ph, lines, y_ticks, x_ticks)
