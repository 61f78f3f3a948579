"""Per-device, per-version, per-window totals: the evidence A/B experiments judge by.

Why a table of its own: the telemetry windows (fleet/telemetry/ingest.py) merge every device
of a cohort into one sketch, which is what drift and rollout gates need, but an experiment
assigns *devices* to arms, and requests from one device are correlated (same site, sensor,
user). A valid test needs one figure per device (fleet/rollouts/experiment_stats.py), so
ingest also adds each accepted report's requests, errors and latency to its device's row of
`telemetry_device_totals` (device_id, model, version, window_start). The rows are written in
the same transaction as the windows (`TelemetryStore.flush`), and only for reports that passed
the (device, seq) deduplication, so a replayed report adds nothing to either.

Latency per device is kept as a count and a sum in ms computed from the histogram's bucket
bounds (`latency_bucket_upper`, the same figure the windows' quantiles use): each request is
counted at its bucket's upper bound, the overflow bucket (no upper bound) at its lower bound.
That overstates a mean by at most one bucket width (2^(1/4), +19 %), the same for both arms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.contract.telemetry import LATENCY_BUCKETS, TelemetryReport, latency_bucket_upper
from fleet.db.session import Db
from fleet.db.sql import SetClause

DEVICE_TOTALS_TABLE = "telemetry_device_totals"
DEVICE_TOTALS_KEY = ("device_id", "model", "version", "window_start")
# ms per latency bucket: the upper bound, and the lower bound for the open-ended last bucket
BUCKET_MS = np.array([latency_bucket_upper(min(i, LATENCY_BUCKETS - 2)) * 1e3
                      for i in range(LATENCY_BUCKETS)])


@dataclass(frozen=True)
class DeviceVersionTotals:
    """One device's sums for one model version over the windows a query covered."""

    device_id: str
    model: str
    version: str
    requests: int
    errors: int
    latency_count: int
    latency_sum_ms: float
    windows: int  # windows with at least one report of this device
    first_window: float
    last_window: float

    @property
    def latency_mean_ms(self) -> float:
        """Mean latency of the device's requests (bucket bounds), NaN when it has none."""
        return self.latency_sum_ms / self.latency_count if self.latency_count else math.nan


def latency_totals(counts: np.ndarray) -> tuple[int, float]:
    """(count, sum in ms) of a latency histogram, each request at its bucket's bound."""
    c = np.asarray(counts, dtype=np.int64)
    if c.size != LATENCY_BUCKETS:  # a foreign histogram: bound each bucket by its own index
        bounds = np.array([latency_bucket_upper(min(i, LATENCY_BUCKETS - 2)) * 1e3 for i in range(c.size)])
    else:
        bounds = BUCKET_MS
    return int(c.sum()), float(np.dot(c.astype(float), bounds))


class DeviceTotalsTable:
    """The totals of accepted reports not yet written (keyed like `telemetry_device_totals`,
    which the telemetry revisions of `fleet.db` create), written and read on the telemetry
    store's connection. Not thread-safe on its own: the telemetry store calls it under its
    lock, as it does for its windows."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str, str, float], list[float]] = {}

    def add(self, report: TelemetryReport, window_start: float) -> None:
        """Buffer one deduplicated report's totals in its device's row of `window_start`."""
        count, total_ms = latency_totals(report.latency_counts)
        key = (report.device_id, report.model, report.version, window_start)
        row = self._pending.setdefault(key, [0, 0, 0, 0.0])
        row[0] += report.requests
        row[1] += report.errors
        row[2] += count
        row[3] += total_ms

    def write(self, db: Db) -> int:
        """Add the buffered totals to the stored rows inside the caller's transaction, so they
        commit with the windows and the seen pairs or not at all; returns the rows written. The
        buffer is kept until `clear()`, which the caller runs once the transaction committed (a
        failed flush retries with the windows it still holds)."""
        rows = [dict(zip(DEVICE_TOTALS_KEY, key, strict=True), requests=int(r[0]), errors=int(r[1]),
                     latency_count=int(r[2]), latency_sum_ms=float(r[3])) for key, r in self._pending.items()]
        db.upsert(DEVICE_TOTALS_TABLE, rows, key=DEVICE_TOTALS_KEY,
                  update={c: _adds(c) for c in ("requests", "errors", "latency_count", "latency_sum_ms")})
        return len(rows)

    def clear(self) -> None:
        self._pending.clear()

    def query(self, db: Db, model: str, version: str,
              since: float | None = None) -> list[DeviceVersionTotals]:
        """Each device's sums for `model` `version` over the windows starting at or after
        `since` (all when None), ordered by device id. Written totals only."""
        sql = (f"SELECT device_id, SUM(requests), SUM(errors), SUM(latency_count), "  # noqa: S608
               "SUM(latency_sum_ms), COUNT(*), MIN(window_start), MAX(window_start) "
               f"FROM {DEVICE_TOTALS_TABLE} "
               "WHERE model = :model AND version = :version AND window_start >= :since "
               "GROUP BY device_id ORDER BY device_id")
        rows = db.execute(sql, {"model": model, "version": version,
                                "since": -math.inf if since is None else since}).fetchall()
        return [DeviceVersionTotals(r[0], model, version, int(r[1]), int(r[2]), int(r[3]), float(r[4]),
                                    int(r[5]), float(r[6]), float(r[7])) for r in rows]


def _adds(column: str) -> SetClause:
    """ON CONFLICT: the stored total plus the new one."""
    return lambda table, excluded: table.c[column] + excluded[column]
