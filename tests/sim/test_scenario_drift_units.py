"""Which telemetry windows the drift scenario judges (`simulators.scenario_drift.judged_windows`)."""

from __future__ import annotations

from typing import Any

import pytest

from simulators.scenario_drift import LATE_S, MIN_ROWS, SETTLE_S, WINDOW_S, judged_windows

pytestmark = pytest.mark.unit


def _w(start: float, rows: int) -> dict[str, Any]:
    return {"window_start": start, "rows": rows}


def _judge(windows: list[dict[str, Any]], now: float) -> tuple[list[float], list[float]]:
    ready, short = judged_windows(windows, now, rows=lambda x: int(x["rows"]))
    return [x["window_start"] for x in ready], short


def test_only_closed_windows_with_enough_rows_are_judged() -> None:
    ws = [_w(0.0, 3000), _w(WINDOW_S, 2500), _w(2 * WINDOW_S, 3000)]
    now = 2 * WINDOW_S + SETTLE_S  # the second window has just settled, the third is open
    assert _judge(ws, now) == ([0.0, WINDOW_S], [])


def test_a_short_young_window_holds_back_the_later_ones_until_it_fills_or_grows_old() -> None:
    ws = [_w(0.0, MIN_ROWS - 1), _w(WINDOW_S, 3000), _w(2 * WINDOW_S, 3000)]
    young = 3 * WINDOW_S + SETTLE_S  # all closed; the short one may still receive late reports
    assert _judge(ws, young) == ([], [])
    filled = [_w(0.0, MIN_ROWS), *ws[1:]]
    assert _judge(filled, young) == ([0.0, WINDOW_S, 2 * WINDOW_S], [])
    old = WINDOW_S + LATE_S + 0.1  # cut by the install for good: left out, the rest judged
    assert _judge(ws, old) == ([WINDOW_S, 2 * WINDOW_S], [0.0])
