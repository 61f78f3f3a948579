"""Scenario reports: a rich table for the terminal, a JSON document for machines, an HTML page.

Why hand-made SVG: matplotlib is not a dependency and the plots are simple (lines over time,
one chart per recorded plot), so `svg_line_chart` draws them in ~60 lines of markup instead
of pulling a plotting stack into the fleet extra. The HTML page is self-contained (inline
SVG, no scripts) so it can be attached to a CI run.

Errors: the writers raise `OSError` when the file cannot be written.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from simulators.scenarios import Series, Verdict

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def to_json(
    verdicts: Sequence[Verdict], elapsed_s: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `--json` document: `scenarios` (name, passed, details, metrics, series) and `elapsed_s`."""
    return {
        "passed": all(v.passed for v in verdicts) and bool(verdicts),
        "elapsed_s": round(elapsed_s, 3),
        "scenarios": [v.to_json() for v in verdicts],
        **(extra or {}),
    }


def write_json(
    path: Path, verdicts: Sequence[Verdict], elapsed_s: float, extra: dict[str, Any] | None = None
) -> None:
    path.write_text(json.dumps(to_json(verdicts, elapsed_s, extra), indent=2) + "\n")


def print_summary(verdicts: Sequence[Verdict], console: Console | None = None) -> None:
    """One row per scenario: verdict, time, key metrics, details."""
    console = console or Console(stderr=False)
    table = Table(title="edgefleet scenarios", show_lines=False)
    table.add_column("scenario")
    table.add_column("verdict")
    table.add_column("time", justify="right")
    table.add_column("metrics")
    table.add_column("details", overflow="fold")
    for v in verdicts:
        mark = "[green]PASS[/green]" if v.passed else "[red]FAIL[/red]"
        metrics = ", ".join(f"{k}={_fmt(x)}" for k, x in list(v.metrics.items())[:6])
        table.add_row(v.name, mark, f"{v.elapsed_s:.1f}s", metrics, v.details)
    console.print(table)


def _fmt(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / (n - 1)
    return [lo + i * step for i in range(n)]


def svg_line_chart(
    title: str, series: Series, width: int = 560, height: int = 260, x_label: str = "seconds"
) -> str:
    """An SVG line chart of `series` (name -> [(x, value)]) with axes, ticks and a legend."""
    left, right, top, bottom = 56, 130, 28, 36
    pw, ph = width - left - right, height - top - bottom
    points = [p for pts in series.values() for p in pts]
    if not points:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text x="4" y="20">'
            f"{html.escape(title)}: no data</text></svg>"
        )
    t_lo, t_hi = min(p[0] for p in points), max(p[0] for p in points)
    v_lo, v_hi = min(p[1] for p in points), max(p[1] for p in points)
    v_lo = min(v_lo, 0.0)
    if v_hi == v_lo:
        v_hi = v_lo + 1.0
    if t_hi == t_lo:
        t_hi = t_lo + 1.0

    def sx(t: float) -> float:
        return left + (t - t_lo) / (t_hi - t_lo) * pw

    def sy(v: float) -> float:
        return top + ph - (v - v_lo) / (v_hi - v_lo) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="16" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for v in _ticks(v_lo, v_hi):
        y = sy(v)
        out.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(round(v, 3))}</text>')
    for t in _ticks(t_lo, t_hi):
        x = sx(t)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{t:.1f}</text>')
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    for i, (name, pts) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        path = " ".join(f"{sx(t):.1f},{sy(v):.1f}" for t, v in sorted(pts))
        if len(pts) == 1:
            t, v = pts[0]
            out.append(f'<circle cx="{sx(t):.1f}" cy="{sy(v):.1f}" r="3" fill="{colour}"/>')
        else:
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        ly = top + 12 + i * 15
        out.append(f'<rect x="{left + pw + 10}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{left + pw + 24}" y="{ly + 1}">{html.escape(name[:18])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(verdicts: Sequence[Verdict], elapsed_s: float, notes: Sequence[str] = ()) -> str:
    """A self-contained HTML report: summary table, then each scenario's metrics and plots."""
    rows = "\n".join(
        f"<tr><td>{html.escape(v.name)}</td><td class={'pass' if v.passed else 'fail'}>"
        f"{'PASS' if v.passed else 'FAIL'}</td><td>{v.elapsed_s:.1f}s</td>"
        f"<td>{html.escape(v.details)}</td></tr>"
        for v in verdicts
    )
    sections = []
    for v in verdicts:
        metrics = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(x)}</td></tr>" for k, x in v.metrics.items()
        )
        charts = "\n".join(
            svg_line_chart(title, s, x_label=v.x_labels.get(title, "seconds"))
            for title, s in v.series.items()
        )
        sections.append(
            f"<h2>{html.escape(v.name)}</h2><p>{html.escape(v.details)}</p>"
            f"<table class=m>{metrics}</table><div>{charts}</div>"
        )
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgefleet scenario report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;vertical-align:top}}.pass{{color:#080}}.fail{{color:#c00}}
table.m td{{font-family:monospace}} svg{{margin:6px}}</style></head><body>
<h1>edgefleet scenario report</h1><p>total {elapsed_s:.1f}s</p><ul>{note_html}</ul>
<table><tr><th>scenario</th><th>verdict</th><th>time</th><th>details</th></tr>{rows}</table>
{"".join(sections)}
</body></html>
"""


def write_html(path: Path, verdicts: Sequence[Verdict], elapsed_s: float, notes: Sequence[str] = ()) -> None:
    path.write_text(render_html(verdicts, elapsed_s, notes))
