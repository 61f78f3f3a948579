"""Dataset versions: samples devices collected under a signed policy, reassembled and checked.

A device uploads its `.npz` sample in chunks (`agent.contract.collect`) on its own topic;
`DatasetStore.ingest_chunk(device_id, payload)` keeps each chunk (a redelivered one is a
duplicate), and when the last one of an upload is in, concatenates them, checks the sha256
every chunk named and that the archive holds a 2-D `x` (no pickles), and records a **dataset
version**: id `<policy>-<device>-<first 12 hex of the digest>`, digest, rows, columns and the
provenance (policy, device, rows seen and kept, collection start and end). `export_npz` gives
the archive back. Bad chunks are counted and refused, never raised.

SQL: two tables created by `ensure_dataset_schema` (portable DDL, TEXT/INTEGER/REAL/BLOB), in
this module's own file like the telemetry tables, so the SQLAlchemy port can lift them as is.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.contract.collect import decode_chunk
from agent.errors import MessageError
from fleet.db.connection import open_sqlite
from fleet.errors import FleetMisuseError, NotFound

MAX_ARCHIVE_BYTES = 80 * 1024 * 1024  # the policy's max_bytes (64 MiB) plus the npz overhead


@dataclass(frozen=True)
class DatasetVersion:
    dataset_id: str
    policy_id: str
    device_id: str
    sha256: str
    rows: int
    columns: int
    bytes: int
    provenance: dict[str, object]
    created_at: float


@dataclass
class DatasetCounters:
    chunks: int = 0
    duplicates: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def ensure_dataset_schema(db: sqlite3.Connection) -> None:
    """Create the chunk and version tables if missing (idempotent)."""
    db.execute("CREATE TABLE IF NOT EXISTS dataset_chunks ("
               "device_id TEXT NOT NULL, upload_id TEXT NOT NULL, idx INTEGER NOT NULL, "
               "total INTEGER NOT NULL, sha256 TEXT NOT NULL, policy_id TEXT NOT NULL, "
               "data BLOB NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (device_id, upload_id, idx))")
    db.execute("CREATE TABLE IF NOT EXISTS dataset_versions ("
               "dataset_id TEXT PRIMARY KEY, policy_id TEXT NOT NULL, device_id TEXT NOT NULL, "
               "sha256 TEXT NOT NULL, rows INTEGER NOT NULL, columns INTEGER NOT NULL, "
               "bytes INTEGER NOT NULL, provenance TEXT NOT NULL, created_at REAL NOT NULL, "
               "archive BLOB NOT NULL)")
    db.commit()


def _check_archive(data: bytes) -> tuple[int, int, dict[str, object]]:
    """(rows, columns, meta) of a collected `.npz`. Raises `MessageError`."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            x, meta = z["x"], json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise MessageError(f"dataset archive: not a collected sample ({exc})") from None
    if x.ndim != 2 or not isinstance(meta, dict):
        raise MessageError("dataset archive: x must be 2-D and meta an object")
    return int(x.shape[0]), int(x.shape[1]), meta


class DatasetStore:
    """Chunks in, dataset versions out, in the SQLite file at `db_path`. Thread-safe."""

    def __init__(self, db_path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.counters = DatasetCounters()
        try:
            self.db = open_sqlite(db_path)
            ensure_dataset_schema(self.db)
        except sqlite3.DatabaseError as exc:
            raise FleetMisuseError(f"dataset store: cannot open {db_path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _reject(self, reason: str) -> str:
        self.counters.rejected += 1
        self.counters.reasons[reason] = self.counters.reasons.get(reason, 0) + 1
        return "rejected"

    def ingest_chunk(self, device_id: str, payload: bytes) -> str:
        """Store one chunk from `device_id`'s own topic: "partial", "complete", "duplicate" or
        "rejected" (malformed, another device's name, disagreeing with the upload's first chunk,
        or a complete archive whose digest or contents do not check)."""
        try:
            c = decode_chunk(payload)
        except MessageError:
            return self._reject("malformed")
        if c.device_id != device_id:
            return self._reject("wrong_device")
        if c.upload_id != c.sha256[:16]:
            return self._reject("malformed")
        with self._lock:
            first = self.db.execute("SELECT total, sha256, policy_id FROM dataset_chunks WHERE device_id = ? "
                                    "AND upload_id = ? LIMIT 1", [device_id, c.upload_id]).fetchone()
            if first is not None and tuple(first) != (c.total, c.sha256, c.policy_id):
                return self._reject("inconsistent")
            cur = self.db.execute("INSERT OR IGNORE INTO dataset_chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  [device_id, c.upload_id, c.index, c.total, c.sha256, c.policy_id, c.data,
                                   self._clock()])
            self.db.commit()
            if cur.rowcount == 0:
                self.counters.duplicates += 1
                return "duplicate"
            self.counters.chunks += 1
            parts = self.db.execute("SELECT data FROM dataset_chunks WHERE device_id = ? AND upload_id = ? "
                                    "ORDER BY idx", [device_id, c.upload_id]).fetchall()
            if len(parts) < c.total:
                return "partial"
            data = b"".join(p[0] for p in parts)
            return self._complete(device_id, c.upload_id, c.policy_id, c.sha256, data)

    def _complete(self, device_id: str, upload_id: str, policy_id: str, sha256: str, data: bytes) -> str:
        """Lock held: check the assembled archive and record the version (or refuse it)."""
        drop = "DELETE FROM dataset_chunks WHERE device_id = ? AND upload_id = ?"
        if len(data) > MAX_ARCHIVE_BYTES or hashlib.sha256(data).hexdigest() != sha256:
            self.db.execute(drop, [device_id, upload_id])
            self.db.commit()
            return self._reject("digest_mismatch")
        try:
            rows, columns, meta = _check_archive(data)
        except MessageError:
            self.db.execute(drop, [device_id, upload_id])
            self.db.commit()
            return self._reject("bad_archive")
        provenance = {"policy_id": policy_id, "device_id": device_id, "upload_id": upload_id,
                      **{k: meta.get(k) for k in ("strategy", "seen", "kept", "started", "ended")}}
        dataset_id = f"{policy_id}-{device_id}-{sha256[:12]}"
        self.db.execute("INSERT OR IGNORE INTO dataset_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [dataset_id, policy_id, device_id, sha256, rows, columns, len(data),
                         json.dumps(provenance, sort_keys=True), self._clock(), data])
        self.db.execute(drop, [device_id, upload_id])
        self.db.commit()
        return "complete"

    def versions(self, policy_id: str | None = None) -> list[DatasetVersion]:
        """Dataset versions, oldest first (all policies when None)."""
        sql = ("SELECT dataset_id, policy_id, device_id, sha256, rows, columns, bytes, provenance, "
               "created_at FROM dataset_versions")
        args: list[object] = []
        if policy_id is not None:
            sql, args = sql + " WHERE policy_id = ?", [policy_id]
        with self._lock:
            found = self.db.execute(sql + " ORDER BY created_at, dataset_id", args).fetchall()
        return [DatasetVersion(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8])
                for r in found]

    def export_npz(self, dataset_id: str) -> bytes:
        """The version's archive (`x`, `confidence`, `meta`). Raises `NotFound`."""
        with self._lock:
            row = self.db.execute("SELECT archive FROM dataset_versions WHERE dataset_id = ?",
                                  [dataset_id]).fetchone()
        if row is None:
            raise NotFound(f"no dataset version {dataset_id!r}")
        return bytes(row[0])
