"""Store-and-forward for telemetry reports: a bounded on-disk queue that survives restarts.

Reports made while the device is offline are encoded and stored in SQLite (stdlib `sqlite3`,
WAL, one transaction per operation, `synchronous=FULL` so that a commit is durable when it
returns: with NORMAL a power cut could take back `next_seq`, and the restarted agent would
reuse sequence numbers the fleet has already seen and drops as duplicates) keyed by their
sequence number; on reconnect they are sent oldest first (`pending()` / `drain()`) and
removed when acknowledged (`ack(seq)`).

When the queue is full (`max_reports` or `max_bytes`), the two oldest reports are merged
into one (sketches are mergeable, so the counts survive and only time resolution is lost);
reports that cannot be merged (another model version) are dropped. Every drop is counted,
persisted, and added to the `dropped_reports` of the next report put, so loss is never
silent. The queue also persists the highest sequence number so a restarted agent never
reuses one (the fleet deduplicates by device and sequence).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.contract.telemetry import TelemetryReport, merge_reports
from agent.contract.telemetry_codec import decode_report, encode_report
from agent.durable_io import fsync_dir
from agent.errors import MessageError, MisuseError
from agent.logs import log_event

log = logging.getLogger("edgefleet.telemetry.queue")


@dataclass(frozen=True)
class QueueConfig:
    """Bounds of the offline queue; `on_full` chooses merging (default) or dropping."""

    max_reports: int = 1440  # a day of one-minute reports
    max_bytes: int = 8 * 1024 * 1024
    on_full: Literal["merge", "drop"] = "merge"

    def __post_init__(self) -> None:
        if self.max_reports < 2 or self.max_bytes < 1024:
            raise MisuseError("queue: max_reports must be >= 2 and max_bytes >= 1024")


class ReportQueue:
    """A bounded, persistent FIFO of encoded reports. Raises `MisuseError` when the file is
    not a usable database; thread-safe."""

    def __init__(self, path: str | Path, config: QueueConfig | None = None) -> None:
        self.config = config or QueueConfig()
        self.path = Path(path)
        self._lock = threading.Lock()
        # False once `pending` found the queue empty; `put` sets it again. An idle agent
        # drains every `report_interval_s`: this keeps those drains off the database.
        self._maybe_pending = True
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS reports (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL,"
                " attempted INTEGER NOT NULL DEFAULT 0)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            fsync_dir(self.path.parent)  # SQLite does not fsync the directory of a new database
        except (sqlite3.DatabaseError, OSError) as exc:
            raise MisuseError(f"queue: cannot open {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ReportQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------
    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def next_seq(self) -> int:
        """The sequence number the next report should carry (persisted across restarts)."""
        with self._lock:
            return self._meta("next_seq")

    def dropped_pending(self) -> int:
        """Reports lost since the last `put` (reported in the next report)."""
        with self._lock:
            return self._meta("dropped_pending")

    def dropped_total(self) -> int:
        """Reports lost over the queue's lifetime."""
        with self._lock:
            return self._meta("dropped_total")

    # -- operations -------------------------------------------------------------------
    def put(self, report: TelemetryReport) -> int:
        """Store a report (adding the pending drop count to its `dropped_reports`), then
        enforce the bounds. Returns the stored sequence number. Raises `MisuseError` when the
        report reuses a sequence number already put."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                next_seq = self._meta("next_seq")
                if report.seq < next_seq:
                    raise MisuseError(f"queue: seq {report.seq} already used (next is {next_seq})")
                report.dropped_reports += self._meta("dropped_pending")
                self._db.execute(
                    "INSERT INTO reports (seq, payload) VALUES (?, ?)", (report.seq, encode_report(report))
                )
                self._set_meta("dropped_pending", 0)
                self._set_meta("next_seq", report.seq + 1)
                self._enforce_bounds()
                self._db.execute("COMMIT")
                self._maybe_pending = True
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (disk full) has already rolled back
                    self._db.execute("ROLLBACK")
                raise
            return report.seq

    def _size(self) -> tuple[int, int]:
        sql = "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM reports"
        n, size = self._db.execute(sql).fetchone()
        return int(n), int(size)

    def _drop(self, seq: int, why: str) -> None:
        self._db.execute("DELETE FROM reports WHERE seq = ?", (seq,))
        self._set_meta("dropped_pending", self._meta("dropped_pending") + 1)
        self._set_meta("dropped_total", self._meta("dropped_total") + 1)
        log_event(log, "telemetry.queue.dropped", seq=seq, reason=why)

    def _enforce_bounds(self) -> None:
        n, size = self._size()
        while n > self.config.max_reports or size > self.config.max_bytes:
            oldest = self._db.execute("SELECT seq FROM reports ORDER BY seq LIMIT 2").fetchall()
            if len(oldest) < 2:  # a single report over max_bytes: keep it, it is the newest
                return
            # Never merge a report already handed out for sending: it may have arrived (and
            # only its ack been lost), and the merged report would carry its seq and be
            # discarded by the fleet as a duplicate, losing the other report's counts.
            rows = self._db.execute(
                "SELECT seq, payload FROM reports WHERE attempted = 0 ORDER BY seq LIMIT 2"
            ).fetchall()
            if self.config.on_full == "drop" or len(rows) < 2:
                self._drop(int(oldest[0][0]), "queue full")
            else:
                (s1, p1), (s2, p2) = rows
                try:
                    merged = merge_reports(decode_report(p1), decode_report(p2))
                except MessageError as exc:
                    self._drop(s1, f"unmergeable: {exc}")
                else:
                    self._db.execute("DELETE FROM reports WHERE seq = ?", (s2,))
                    payload = encode_report(merged)
                    self._db.execute("UPDATE reports SET payload = ? WHERE seq = ?", (payload, s1))
                    log_event(log, "telemetry.queue.merged", seq=s1, absorbed=s2)
            n, size = self._size()

    def pending(self, limit: int | None = None) -> list[tuple[int, bytes]]:
        """Queued (seq, encoded report) pairs, oldest first. They are marked as handed out:
        from now on they are never merged (only dropped, and counted, if the queue fills)."""
        with self._lock:
            if not self._maybe_pending:
                return []
            rows = self._db.execute(
                "SELECT seq, payload FROM reports ORDER BY seq LIMIT ?", (-1 if limit is None else limit,)
            ).fetchall()
            self._maybe_pending = bool(rows)
            if rows:
                self._db.execute("UPDATE reports SET attempted = 1 WHERE seq <= ?", (rows[-1][0],))
        return [(int(s), bytes(p)) for s, p in rows]

    def ack(self, seq: int) -> bool:
        """Remove an acknowledged report; False when it was not queued (already acked)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM reports WHERE seq = ?", (seq,))
            return cur.rowcount > 0

    def drain(self, send: Callable[[int, bytes], bool], limit: int | None = None) -> int:
        """Send queued reports in order through `send(seq, payload) -> delivered`, acking each
        delivered one and stopping at the first failure. Returns how many were delivered."""
        sent = 0
        for seq, payload in self.pending(limit):
            if not send(seq, payload):
                break
            self.ack(seq)
            sent += 1
        return sent

    def __len__(self) -> int:
        with self._lock:
            return self._size()[0]
