"""A flush writes its windows' serving figures in one batch (fleet/telemetry/serving.py): the
totals of a key are what flushing each report on its own gives (counters summed, histogram summed,
gauges from the latest window), and so are the per-window rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.telemetry.ingest import TelemetryStore
from tests.support.telemetry import T0, encoded_reports, small_profile

pytestmark = pytest.mark.unit


def _figures(store: TelemetryStore) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    totals = [(t.model, t.version, t.cohort, t.requests, t.errors, t.rejected, round(t.latency_sum_s, 9),
               tuple(t.latency_counts.tolist()), round(t.cpu_s, 9), t.rss_max_bytes, t.devices,
               t.latest_window) for t in store.serving_totals(0.0, 100)]
    with store.database.read() as db:
        rows = db.execute("SELECT model, version, cohort, window_start, requests, errors, latency_counts, "
                          "devices FROM telemetry_serving ORDER BY model, version, cohort, window_start"
                          ).fetchall()
    return totals, [(*r[:6], bytes(r[6]), r[7]) for r in rows]


def test_one_batched_flush_writes_what_flushing_each_report_writes(tmp_path: Path) -> None:
    reports = [*encoded_reports(small_profile(), "m", "1", "a", devices=3, shifts=[0.0, 0.5, 1.0], rows=7),
               *encoded_reports(small_profile(), "m", "2", "b", devices=2, shifts=[0.0, 0.0], rows=4, seed=1)]
    batched = TelemetryStore(tmp_path / "batched.db", clock=lambda: T0 + 10_000)
    single = TelemetryStore(tmp_path / "single.db", clock=lambda: T0 + 10_000)
    try:
        for r in reports:
            assert batched.ingest(r) == "accepted"
            assert single.ingest(r) == "accepted"
            single.flush()  # one window per flush
        assert batched.flush() == 5  # 3 windows of (m, 1, a), 2 of (m, 2, b) in one flush
        got, want = _figures(batched), _figures(single)
        assert len(got[0]) == 2 and len(got[1]) == 5
        assert got == want
        assert got[0][0][3] == 3 * 3  # requests (one per report here): every report once
        assert np.sum(got[0][0][7]) == 3 * 3
    finally:
        batched.close()
        single.close()
