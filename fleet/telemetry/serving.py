"""Serving figures per model version and cohort: what /metrics exports and what regressions judge.

Why tables of their own: the telemetry windows hold the same counts inside encoded sketches,
and decoding every window at each scrape, or every cycle of the health watch, costs more than
the reports did to ingest. So `TelemetryStore.flush`, in the transaction that writes the
windows, also writes here:

- `telemetry_serving` (model, version, cohort, window_start): the merged window's requests,
  errors, rejected requests, latency histogram (the reports' log buckets, int64 bytes),
  latency sum, peak RSS of any device, CPU seconds and devices; replaced with the merged
  window, so late reports simply update it. The health watch sums a span of these per version
  (`samples`);
- `telemetry_serving_totals` (model, version, cohort): the same figures added up since the
  store began, from each flush's *new* reports only (so a window merged twice is not counted
  twice; deduplicated reports add nothing, as for the windows), plus the peak RSS of the
  latest window. Prometheus counters are these sums (`totals`): exact across fleet restarts.

Both tables are declared in `fleet.db.schema` (TELEMETRY group) and created by the Alembic
revision telemetry_0003; the SQL is portable (the layer's upsert, named binds), the same on
SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.contract.telemetry import LATENCY_BUCKETS, TelemetryReport
from fleet.db.session import Db
from fleet.db.sql import SetClause
from fleet.telemetry.alert_rules import ServingSample

SERVING_TABLE = "telemetry_serving"
SERVING_TOTALS_TABLE = "telemetry_serving_totals"
_KEY = ("model", "version", "cohort")


@dataclass(frozen=True)
class ServingTotals:
    """One (model, version, cohort)'s figures since the store began (counters at /metrics)."""

    model: str
    version: str
    cohort: str
    requests: int
    errors: int
    rejected: int
    latency_sum_s: float
    latency_counts: np.ndarray = field(repr=False)
    cpu_s: float
    rss_max_bytes: int  # peak RSS of any device in the latest window
    devices: int  # devices in the latest window
    latest_window: float
    updated_at: float


def _counts(blob: bytes | None) -> np.ndarray:
    if not blob:
        return np.zeros(LATENCY_BUCKETS, np.int64)
    arr = np.frombuffer(blob, dtype="<i8")
    return arr.astype(np.int64) if arr.size == LATENCY_BUCKETS else np.zeros(LATENCY_BUCKETS, np.int64)


def _bytes(value: object) -> bytes | None:
    """A blob as bytes (psycopg returns a memoryview for bytea, sqlite3 bytes)."""
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def _blob(counts: np.ndarray) -> bytes:
    c = np.asarray(counts, dtype="<i8")
    return (c if c.size == LATENCY_BUCKETS else np.zeros(LATENCY_BUCKETS, "<i8")).tobytes()


@dataclass(frozen=True)
class WindowWrite:
    """One window of a flush: its key, the flush's `new` reports (already merged into it), the
    `merged` window (stored plus new) and its device count."""

    key: tuple[str, str, str, float]
    new: TelemetryReport
    merged: TelemetryReport
    devices: int


def write_windows(db: Db, windows: list[WindowWrite], now: float) -> None:
    """Inside the caller's transaction: replace each window's row with its `merged` window, and
    add the flush's `new` reports to the totals of each (model, version, cohort).

    Batched: one multi-row upsert of the window rows, then one read and one upsert per key for
    the totals, not three statements per window (on PostgreSQL each is a round trip, and the
    totals upsert is compiled afresh each time; per window this was most of a flush's time)."""
    if not windows:
        return
    db.upsert(SERVING_TABLE, [_window_row(w, now) for w in windows], key=(*_KEY, "window_start"))
    by_key: dict[tuple[str, str, str], list[WindowWrite]] = {}
    for w in windows:
        by_key.setdefault(w.key[:3], []).append(w)
    for (model, version, cohort), group in by_key.items():
        _add_totals(db, model, version, cohort, group, now)


def _window_row(w: WindowWrite, now: float) -> dict[str, object]:
    model, version, cohort, start = w.key
    m = w.merged
    return {
        "model": model, "version": version, "cohort": cohort, "window_start": start,
        "requests": m.requests, "errors": m.errors, "rejected": m.rejected,
        "latency_sum_s": m.latency_sum_s, "latency_counts": _blob(m.latency_counts),
        "cpu_s": m.resources.cpu_user_s + m.resources.cpu_system_s,
        "rss_max_bytes": m.resources.rss_max_bytes, "devices": w.devices, "updated_at": now,
    }


def _add_totals(db: Db, model: str, version: str, cohort: str, group: list[WindowWrite], now: float) -> None:
    row = db.one(f"SELECT latency_counts, latest_window FROM {SERVING_TOTALS_TABLE} "  # noqa: S608
                 "WHERE model = :model AND version = :version AND cohort = :cohort",
                 {"model": model, "version": version, "cohort": cohort})
    counts = _counts(None if row is None else _bytes(row["latency_counts"]))
    for w in group:
        counts = counts + np.asarray(w.new.latency_counts, dtype=np.int64)
    last = max(group, key=lambda w: w.key[3])  # the gauges follow the latest window only
    latest = row is None or last.key[3] >= float(row["latest_window"])
    # Counters add; the histogram was summed above.
    update: dict[str, SetClause] = {c: _adds(c) for c in ("requests", "errors", "rejected", "latency_sum_s",
                                                          "cpu_s")}
    update.update({c: _new(c) for c in ("latency_counts", "updated_at")})
    if latest:
        update.update({c: _new(c) for c in ("rss_max_bytes", "devices", "latest_window")})
    db.upsert(SERVING_TOTALS_TABLE, {
        "model": model, "version": version, "cohort": cohort,
        "requests": sum(w.new.requests for w in group), "errors": sum(w.new.errors for w in group),
        "rejected": sum(w.new.rejected for w in group),
        "latency_sum_s": sum(w.new.latency_sum_s for w in group), "latency_counts": _blob(counts),
        "cpu_s": sum(w.new.resources.cpu_user_s + w.new.resources.cpu_system_s for w in group),
        "rss_max_bytes": last.merged.resources.rss_max_bytes, "devices": last.devices, "updated_at": now,
        "latest_window": last.key[3],
    }, key=_KEY, update=update)


def _adds(column: str) -> SetClause:
    """ON CONFLICT: the stored figure plus the new one."""
    return lambda table, excluded: table.c[column] + excluded[column]


def _new(column: str) -> SetClause:
    """ON CONFLICT: the new value."""
    return lambda table, excluded: excluded[column]


def totals(db: Db, updated_since: float, limit: int) -> list[ServingTotals]:
    """The totals of keys written at or after `updated_since`, the `limit` most recent ones
    (bounded label cardinality at /metrics), ordered by key."""
    rows = db.execute(
        f"SELECT model, version, cohort, requests, errors, rejected, latency_sum_s, latency_counts, cpu_s, "  # noqa: S608
        f"rss_max_bytes, devices, latest_window, updated_at FROM {SERVING_TOTALS_TABLE} "
        "WHERE updated_at >= :since ORDER BY updated_at DESC, model, version, cohort LIMIT :limit",
        {"since": updated_since, "limit": max(0, limit)}).fetchall()
    out = [ServingTotals(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), float(r[6]),
                         _counts(_bytes(r[7])), float(r[8]), int(r[9]), int(r[10]), float(r[11]),
                         float(r[12])) for r in rows]
    return sorted(out, key=lambda t: (t.model, t.version, t.cohort))


@dataclass
class _Sum:
    requests: int = 0
    errors: int = 0
    rejected: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(LATENCY_BUCKETS, np.int64))
    first: float = float("inf")
    devices: int = 0


def samples(db: Db, since: float, until: float
            ) -> dict[tuple[str, str], list[ServingSample]]:
    """(model, cohort) -> one `ServingSample` per version, summed over the windows starting in
    [since, until): what the regression rules compare."""
    rows = db.execute(
        f"SELECT model, cohort, version, requests, errors, rejected, latency_counts, window_start, devices "  # noqa: S608
        f"FROM {SERVING_TABLE} WHERE window_start >= :since AND window_start < :until "
        "ORDER BY model, cohort, version, window_start", {"since": since, "until": until}).fetchall()
    acc: dict[tuple[str, str, str], _Sum] = {}
    for model, cohort, version, req, err, rej, blob, start, devices in rows:
        a = acc.setdefault((model, cohort, version), _Sum())
        a.requests += int(req)
        a.errors += int(err)
        a.rejected += int(rej)
        a.counts = a.counts + _counts(_bytes(blob))
        a.first = min(a.first, float(start))
        a.devices = max(a.devices, int(devices))
    out: dict[tuple[str, str], list[ServingSample]] = {}
    for (model, cohort, version), a in acc.items():
        out.setdefault((model, cohort), []).append(
            ServingSample(version, a.requests, a.errors, a.rejected, a.counts, a.first, a.devices))
    return out
