"""Telemetry ingest: decode, validate, deduplicate and merge device reports into windows.

Every payload is decoded with the bounded decoder and checked against the model version's
reference profile; a bad one is counted, logged and dropped, and never stops the ingester.
Reports are deduplicated by (device, sequence) (devices replay their offline queue, MQTT
QoS 1 redelivers) and merged into one sketch per (model, version, cohort, window), where
the window is `window_s` seconds of device time (the report's `interval_end`, clamped to
the server clock). Merged windows are buffered in memory and written in batches (one
transaction per `flush`, which also adds each device's totals: fleet/telemetry/device_totals.py,
since A/B experiments judge by device, and the serving figures /metrics and the health watch
read: fleet/telemetry/serving.py) through the fleet's database layer (`fleet.db`: its own
SQLite file, WAL, by default; the fleet's PostgreSQL database with `--database`).

Several ingest workers (a shared subscription, docs/scaling.md) may each get a copy of the same
report: the in-memory check only catches this worker's own repeats, so a report is merged only
once its (device, seq) row is *claimed* in the database at flush (`INSERT ... ON CONFLICT DO
NOTHING RETURNING`, one statement per batch, the same on PostgreSQL): the worker whose insert
won merges it, the other counts a duplicate. The claim, the window merges and the totals
commit in one transaction, so a crash between them neither loses nor doubles a report.

Across devices, quantiles of per-device figures (each report's mean latency) have no
reference edges, so each window also keeps a datasketches KLL sketch of them. The read side
(windows, drift, quantiles, paging) is fleet/telemetry/window_queries.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from datasketches import kll_floats_sketch

from agent.contract.manifest import ReferenceProfile
from agent.contract.performance import check_performance_shape, copy_performance
from agent.contract.telemetry import (
    CategoricalSketch,
    FeatureSketch,
    TelemetryReport,
    merge_into,
    profile_digest,
)
from agent.contract.telemetry_codec import (
    MAX_DECOMPRESSED_BYTES,
    MAX_REPORT_BYTES,
    check_report_shape,
    decode_report,
    encode_report,
)
from agent.errors import MessageError
from agent.logs import log_event
from fleet.db.database import Database
from fleet.db.session import Db
from fleet.db.sql import upsert_statement
from fleet.db.telemetry_tables import telemetry_seen
from fleet.errors import FleetMisuseError
from fleet.telemetry import serving
from fleet.telemetry.device_totals import DeviceTotalsTable
from fleet.telemetry.window_queries import KLL_K, WINDOWS_TABLE, WindowQueries

log = logging.getLogger("edgefleet.fleet.telemetry")

SEEN_TABLE = "telemetry_seen"
WINDOW_KEY = ("model", "version", "cohort", "window_start")
MAX_WINDOW_DEVICES = 1000  # device ids listed per window (the count stays exact up to this)

ProfileLookup = Callable[[str, str], ReferenceProfile | None]

# The claim of a batch's (device, seq) rows on PostgreSQL (`TelemetryStore._claim`); an
# Executable, so `fleet.db.session.statement` leaves its list binds as arrays.
_CLAIM_PG = sa.text(
    f"INSERT INTO {SEEN_TABLE} (device_id, seq, received_at) "  # noqa: S608 - constant name
    "SELECT * FROM unnest(CAST(:d AS text[]), CAST(:s AS bigint[]), CAST(:t AS double precision[])) "
    "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq")
FLUSH_LOCK_KEY = 0x7465_6C65  # "tele": PostgreSQL advisory lock serialising window flushes


@dataclass(frozen=True)
class IngestConfig:
    """Window length, payload bounds, batch size and how long (device, seq) pairs are kept."""

    window_s: float = 60.0
    max_report_bytes: int = MAX_REPORT_BYTES
    max_decompressed: int = MAX_DECOMPRESSED_BYTES
    flush_every: int = 1000
    seen_retention_s: float = 14 * 24 * 3600.0
    max_clock_skew_s: float = 300.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.flush_every < 1:
            raise FleetMisuseError("ingest: window_s must be > 0 and flush_every >= 1")


@dataclass
class IngestCounters:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Window:
    report: TelemetryReport
    reports: int
    devices: set[str]
    kll: kll_floats_sketch


def owned_copy(report: TelemetryReport) -> TelemetryReport:
    """A copy of `report` that owns its count arrays (int64, so a window's sums cannot wrap),
    to merge a window's other reports into: what `copy.deepcopy` gave, without walking every
    attribute of every sketch (that was most of a flush's merge time, once per window). Pure."""
    def sketch(x: FeatureSketch) -> FeatureSketch:
        if isinstance(x, CategoricalSketch):
            return dataclasses.replace(x, counts=x.counts.astype(np.int64), unseen=dict(x.unseen))
        return dataclasses.replace(x, counts=x.counts.astype(np.int64))

    return dataclasses.replace(
        report, features=[sketch(f) for f in report.features], outputs=[sketch(o) for o in report.outputs],
        latency_counts=report.latency_counts.astype(np.int64),
        resources=dataclasses.replace(report.resources),
        performance=None if report.performance is None else copy_performance(report.performance))


class TelemetryStore(WindowQueries):
    """Ingest and query merged telemetry windows at `location`: a SQLite file (telemetry.db) or
    the fleet's `postgresql://` URL (tables of the `telemetry` group of `fleet.db.schema`).

    `profiles(model, version)` returns the version's reference profile (reports that do not
    match it, or name an unknown version, are rejected); without it only the encoding is
    checked. Thread-safe. Raises `FleetMisuseError` when the database cannot be opened.
    """

    def __init__(
        self,
        location: str | Path,
        config: IngestConfig | None = None,
        profiles: ProfileLookup | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or IngestConfig()
        self._profiles = profiles
        self._clock = clock
        self._lock = threading.RLock()
        self._pending: dict[tuple[str, str, str, float], _Window] = {}
        self._pending_seen: dict[tuple[str, int], float] = {}
        self._batch: list[tuple[tuple[str, str, str, float], TelemetryReport]] = []  # merged at flush
        self._max_seq: dict[str, int] = {}
        self._shapes: dict[tuple[str, str], tuple[list[int], list[int], str] | None] = {}
        self.counters = IngestCounters()
        # Used by threads (MQTT callbacks, API handlers, gates), always under `self._lock`.
        self.database = Database(location, "telemetry", "telemetry store")
        self._device_totals = DeviceTotalsTable()  # written with the windows, in `flush`

    def close(self) -> None:
        with self._lock:
            self.flush()
            self.database.close()

    # -- ingest -----------------------------------------------------------------------
    def _reject(self, reason: str, detail: str) -> str:
        self.counters.rejected += 1
        self.counters.reasons[reason] = self.counters.reasons.get(reason, 0) + 1
        log_event(log, "telemetry.rejected", reason=reason, detail=detail[:200])
        return "rejected"

    def _shape(self, model: str, version: str) -> tuple[list[int], list[int], str] | None:
        """(feature bin counts, output bin counts, profile digest) of a version, cached."""
        key = (model, version)
        if key not in self._shapes:
            prof = self._profiles(model, version) if self._profiles else None
            self._shapes[key] = None if prof is None else (
                [len(f.edges) + 1 if f.kind == "numeric" else len(f.vocabulary) + 1 for f in prof.features],
                [len(f.edges) + 1 if f.kind == "numeric" else len(f.vocabulary) + 1 for f in prof.outputs],
                profile_digest(prof),
            )
        return self._shapes[key]

    def _seen(self, device: str, seq: int) -> bool:
        """Devices send in sequence order, so a seq above the device's highest one is new
        without a lookup; only replays and out-of-order reports reach the table."""
        if (device, seq) in self._pending_seen:
            return True
        top = self._max_seq.get(device)
        if top is None:
            sql = f"SELECT MAX(seq) FROM {SEEN_TABLE} WHERE device_id = :device"  # noqa: S608 - constant name
            with self.database.read() as db:
                found = db.scalar(sql, {"device": device})
            top = self._max_seq[device] = -1 if found is None else int(found)
        if seq > top:
            return False
        sql = f"SELECT 1 FROM {SEEN_TABLE} WHERE device_id = :device AND seq = :seq"  # noqa: S608 - constant name
        with self.database.read() as db:
            return db.scalar(sql, {"device": device, "seq": seq}) is not None

    def ingest(self, payload: bytes, cohort: str | None = None) -> str:
        """Ingest one payload; returns "accepted", "duplicate" or "rejected". Never raises for
        bad input. `cohort` overrides the report's own cohort (e.g. the rollout arm the fleet
        assigned the device to)."""
        try:
            report = decode_report(payload, self.config.max_report_bytes, self.config.max_decompressed)
        except MessageError as exc:
            return self._reject("malformed", str(exc))
        with self._lock:
            if self._profiles is not None:
                shape = self._shape(report.model, report.version)
                if shape is None:
                    return self._reject("unknown_version", f"{report.model} {report.version}")
                try:
                    check_report_shape(report, shape[0], shape[1])
                except MessageError as exc:
                    return self._reject("profile_mismatch", str(exc))
                if report.profile_id and report.profile_id != shape[2]:
                    return self._reject("profile_mismatch", f"profile_id {report.profile_id} != {shape[2]}")
                if report.performance is not None:
                    prof = self._profiles(report.model, report.version)
                    try:
                        if prof is not None:
                            check_performance_shape(report.performance, prof)
                    except MessageError as exc:
                        return self._reject("performance_mismatch", str(exc))
            if self._seen(report.device_id, report.seq):
                self.counters.duplicates += 1
                return "duplicate"
            now = self._clock()
            stamp = min(report.interval_end, now + self.config.max_clock_skew_s)
            start = math.floor(stamp / self.config.window_s) * self.config.window_s
            key = (report.model, report.version, cohort if cohort is not None else report.cohort, start)
            self._batch.append((key, report))  # merged at flush, once its (device, seq) is claimed
            self._pending_seen[(report.device_id, report.seq)] = now
            self._max_seq[report.device_id] = max(self._max_seq.get(report.device_id, -1), report.seq)
            self.counters.accepted += 1
            if len(self._pending_seen) >= self.config.flush_every:
                self.flush()
            return "accepted"

    def _merge(self, key: tuple[str, str, str, float], report: TelemetryReport) -> None:
        """Merge one claimed report into its pending window (and the device's totals)."""
        window = self._pending.get(key)
        if window is None:
            # a copy owns the merged arrays: the batch's reports stay as received, so a failed
            # flush can be retried without counting its first report twice
            first = owned_copy(report)
            window = self._pending[key] = _Window(first, 0, set(), kll_floats_sketch(KLL_K))
        else:
            try:
                merge_into(window.report, report)  # the decoded first report owns its arrays
            except MessageError as exc:
                self.counters.accepted -= 1
                self._reject("profile_mismatch", str(exc))
                return
        window.reports += 1
        self._device_totals.add(report, key[3])  # past the dedup and merge checks: once per report
        if len(window.devices) < MAX_WINDOW_DEVICES:
            window.devices.add(report.device_id)
        if report.requests:
            window.kll.update(report.latency_sum_s / report.requests)

    def _claim(self, db: Db) -> set[tuple[str, int]]:
        """Insert the batch's (device, seq) rows; those another worker stored first are left out
        of the answer (call inside the flush transaction): the unique key, not memory, decides
        which worker counts a report that reached two of them.

        One executemany of one cached statement (SQLAlchemy's "insertmanyvalues" batches it into
        multi-row INSERT ... RETURNING on both dialects), rather than a statement built with the
        rows as VALUES: that one was compiled afresh for every 300 rows, which cost more than the
        round trips on PostgreSQL.

        On PostgreSQL: one statement over three arrays (`unnest`), since insertmanyvalues sends a
        statement with three placeholders per row, which psycopg re-parsed for every flush (its
        query cache skips long statements): a fifth of a flush's CPU under the profiler."""
        if not self._pending_seen:
            return set()
        if db.dialect == "postgresql":
            keys = list(self._pending_seen)
            args = {"d": [d for d, _ in keys], "s": [q for _, q in keys],
                    "t": list(self._pending_seen.values())}
            return {(str(d), int(q)) for d, q in db.execute(_CLAIM_PG, args).fetchall()}
        table = telemetry_seen
        rows = [{"device_id": d, "seq": q, "received_at": t} for (d, q), t in self._pending_seen.items()]
        stmt = upsert_statement(db.dialect, table, ("device_id", "seq"), rows[0].keys(), update=())
        won = db.execute(stmt.returning(table.c.device_id, table.c.seq), rows)
        return {(str(d), int(q)) for d, q in won.fetchall()}

    def flush(self) -> int:
        """Claim the batch's (device, seq) pairs, merge the reports this worker won and write the
        windows (merged with what is stored) in one transaction; returns the windows written.

        Flushes of several workers are serialised: on SQLite by the write transaction's
        `BEGIN IMMEDIATE`, on PostgreSQL by a transaction-scoped advisory lock, so two workers
        never both read a window and the second overwrite the first one's merge."""
        with self._lock:
            if not self._batch:
                self._pending_seen.clear()
                return 0
            now = self._clock()
            rows, served = [], []  # the windows' rows; their serving figures (fleet/telemetry/serving.py)
            try:
                with self.database.tx() as db:
                    if db.dialect == "postgresql":
                        db.execute("SELECT pg_advisory_xact_lock(:key)", {"key": FLUSH_LOCK_KEY})
                    claimed = self._claim(db)
                    for key, report in self._batch:
                        if (report.device_id, report.seq) in claimed:
                            self._merge(key, report)
                        else:  # another worker stored it first
                            self.counters.accepted -= 1
                            self.counters.duplicates += 1
                    known = self._stored_windows(db)
                    for k, w in self._pending.items():
                        (model, version, cohort, start), stored = k, known.get(k)
                        report, reports, devices, kll = w.report, w.reports, set(w.devices), w.kll
                        if stored is not None:
                            try:
                                older = decode_report(stored[0], max_bytes=2**31)
                                merge_into(older, report)
                                report = older
                            except MessageError as exc:  # a profile changed under a version: keep the new
                                log_event(log, "telemetry.window_reset", model=model, version=version,
                                          error=str(exc))
                            else:
                                reports += stored[1]
                                devices |= set(json.loads(stored[2]))
                                kll.merge(kll_floats_sketch.deserialize(stored[3]))
                        served.append(serving.WindowWrite(k, w.report, report, len(devices)))
                        listed = sorted(devices)[:MAX_WINDOW_DEVICES]
                        rows.append({
                            "model": model, "version": version, "cohort": cohort, "window_start": start,
                            "payload": encode_report(report), "reports": reports,
                            "devices": json.dumps(listed), "device_count": len(devices),
                            "latency_kll": kll.serialize(), "updated_at": now,
                        })
                    serving.write_windows(db, served, now)  # one batch, as the windows
                    db.upsert(WINDOWS_TABLE, rows, key=WINDOW_KEY)
                    self._device_totals.write(db)
                    db.execute(f"DELETE FROM {SEEN_TABLE} WHERE received_at < :cutoff",  # noqa: S608
                               {"cutoff": now - self.config.seen_retention_s})
            except BaseException:
                self._pending.clear()  # the batch stays: the next flush merges it again
                self._device_totals.clear()
                raise
            self._pending.clear()
            self._pending_seen.clear()
            self._batch.clear()
            self._device_totals.clear()
            return len(rows)

    def _stored_windows(self, db: Db) -> dict[tuple[str, str, str, float], tuple[Any, ...]]:
        """The stored rows of the buffered windows, one query per (model, version, cohort)
        rather than one per window: on PostgreSQL each statement is a network round trip."""
        groups: dict[tuple[str, str, str], list[float]] = {}
        for model, version, cohort, start in self._pending:
            groups.setdefault((model, version, cohort), []).append(start)
        out: dict[tuple[str, str, str, float], tuple[Any, ...]] = {}
        sql = (f"SELECT window_start, payload, reports, devices, latency_kll FROM {WINDOWS_TABLE} "  # noqa: S608
               "WHERE model = :model AND version = :version AND cohort = :cohort AND window_start IN :starts")
        for (model, version, cohort), starts in groups.items():
            for i in range(0, len(starts), 500):  # bounded IN lists, whatever flush_every is
                part = {"model": model, "version": version, "cohort": cohort, "starts": starts[i:i + 500]}
                for r in db.execute(sql, part):
                    out[(model, version, cohort, float(r[0]))] = tuple(r[1:])
        return out
