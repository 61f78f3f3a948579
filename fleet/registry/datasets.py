"""Dataset versions: samples devices collected under a signed policy, reassembled and checked.

A device uploads its `.npz` sample in chunks (`agent.contract.collect`) on its own topic;
`DatasetStore.ingest_chunk(device_id, payload)` keeps each chunk (a redelivered one is a
duplicate), and when the last one of an upload is in, concatenates them, checks the sha256
every chunk named and that the archive holds a 2-D `x` (no pickles), and records a **dataset
version**: id `<policy>-<device>-<first 12 hex of the digest>`, digest, rows, columns and the
provenance (policy, device, rows seen, kept and labelled, collection start and end).
`export_npz` gives the archive back with a `labels` column (float64, NaN for a row whose label
never reached the device while it held the sample); an archive from an agent before labels
(no `labels` member) is still admitted, and exported with every label NaN. A `labels` member
that is not one number per row refuses the archive. Bad chunks are counted and refused, never
raised.

SQL: the two tables `dataset_chunks` and `dataset_versions` of the telemetry group
(`fleet.db.schema`, revision `telemetry_0002`): beside the telemetry windows in `telemetry.db`
on SQLite, in the one database on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.contract.collect import decode_chunk
from agent.errors import MessageError
from fleet.db.database import Database
from fleet.db.session import Db
from fleet.errors import NotFound

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

    @property
    def labelled(self) -> int:
        """Rows that carry a device label (0 for a version from before labels)."""
        n = self.provenance.get("labelled", 0)
        return n if isinstance(n, int) else 0


@dataclass
class DatasetCounters:
    chunks: int = 0
    duplicates: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _check_archive(data: bytes) -> tuple[int, int, int, dict[str, object]]:
    """(rows, columns, labelled rows, meta) of a collected `.npz`. Raises `MessageError`."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            x, meta = z["x"], json.loads(bytes(z["meta"]).decode())
            labels = z["labels"] if "labels" in z.files else None
    except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise MessageError(f"dataset archive: not a collected sample ({exc})") from None
    if x.ndim != 2 or not isinstance(meta, dict):
        raise MessageError("dataset archive: x must be 2-D and meta an object")
    labelled = 0
    if labels is not None:
        if labels.shape != (x.shape[0],) or labels.dtype.kind != "f":
            raise MessageError("dataset archive: labels must be one float per row of x")
        if np.isinf(labels).any():
            raise MessageError("dataset archive: labels must be finite or NaN (unknown)")
        labelled = int(np.count_nonzero(~np.isnan(labels)))
    return int(x.shape[0]), int(x.shape[1]), labelled, meta


def _with_labels(data: bytes) -> bytes:
    """The archive as it is when it has a `labels` column, else re-written with one of NaN."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if "labels" in z.files:
            return data
        arrays = {k: np.asarray(z[k]) for k in z.files}
    arrays["labels"] = np.full(arrays["x"].shape[0], np.nan)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


class DatasetStore:
    """Chunks in, dataset versions out, in the telemetry database at `location` (a SQLite file
    or a `postgresql://` URL). Thread-safe. Raises FleetMisuseError when it cannot be opened."""

    def __init__(self, location: str | Path, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # one upload's check-then-complete at a time
        self.counters = DatasetCounters()
        self.database = Database(location, "telemetry", "dataset store")

    def close(self) -> None:
        with self._lock:
            self.database.close()

    def _reject(self, reason: str) -> str:
        self.counters.rejected += 1
        self.counters.reasons[reason] = self.counters.reasons.get(reason, 0) + 1
        return "rejected"

    def refuse(self, reason: str) -> str:
        """Count a chunk refused before it reached the store (e.g. `no_policy`); "rejected"."""
        with self._lock:
            return self._reject(reason)

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
        key = {"device_id": device_id, "upload_id": c.upload_id}
        with self._lock, self.database.tx() as db:
            first = db.one("SELECT total, sha256, policy_id FROM dataset_chunks WHERE device_id = :device_id "
                           "AND upload_id = :upload_id LIMIT 1", key)
            if first is not None and (first["total"], first["sha256"], first["policy_id"]) != (
                    c.total, c.sha256, c.policy_id):
                return self._reject("inconsistent")
            before = db.scalar("SELECT count(*) FROM dataset_chunks WHERE device_id = :device_id "
                               "AND upload_id = :upload_id", key)
            chunk = {**key, "idx": c.index, "total": c.total, "sha256": c.sha256, "policy_id": c.policy_id,
                     "data": c.data, "received_at": self._clock()}
            db.upsert("dataset_chunks", chunk, key=("device_id", "upload_id", "idx"), update=())
            parts = db.query("SELECT data FROM dataset_chunks WHERE device_id = :device_id "
                             "AND upload_id = :upload_id ORDER BY idx", key)
            if len(parts) == before:
                self.counters.duplicates += 1
                return "duplicate"
            self.counters.chunks += 1
            if len(parts) < c.total:
                return "partial"
            data = b"".join(bytes(p["data"]) for p in parts)
            return self._complete(db, device_id, c.upload_id, c.policy_id, c.sha256, data)

    def _complete(self, db: Db, device_id: str, upload_id: str, policy_id: str, sha256: str,
                  data: bytes) -> str:
        """Lock and transaction held: check the assembled archive and record the version (or
        refuse it); either way the upload's chunks go."""
        db.execute("DELETE FROM dataset_chunks WHERE device_id = :device_id AND upload_id = :upload_id",
                   {"device_id": device_id, "upload_id": upload_id})
        if len(data) > MAX_ARCHIVE_BYTES or hashlib.sha256(data).hexdigest() != sha256:
            return self._reject("digest_mismatch")
        try:
            rows, columns, labelled, meta = _check_archive(data)
        except MessageError:
            return self._reject("bad_archive")
        provenance = {"policy_id": policy_id, "device_id": device_id, "upload_id": upload_id,
                      **{k: meta.get(k) for k in ("strategy", "seen", "kept", "started", "ended")},
                      "labelled": labelled}  # counted here, not taken from the device's meta
        dataset_id = f"{policy_id}-{device_id}-{sha256[:12]}"
        db.upsert("dataset_versions", {
            "dataset_id": dataset_id, "policy_id": policy_id, "device_id": device_id, "sha256": sha256,
            "rows": rows, "columns": columns, "bytes": len(data),
            "provenance": json.dumps(provenance, sort_keys=True), "created_at": self._clock(),
            "archive": data,
        }, key=("dataset_id",), update=())
        return "complete"

    def versions(self, policy_id: str | None = None) -> list[DatasetVersion]:
        """Dataset versions, oldest first (all policies when None)."""
        sql = ("SELECT dataset_id, policy_id, device_id, sha256, rows, columns, bytes, provenance, "
               "created_at FROM dataset_versions")
        args: dict[str, object] = {}
        if policy_id is not None:
            sql, args = sql + " WHERE policy_id = :policy_id", {"policy_id": policy_id}
        with self.database.read() as db:
            found = db.query(sql + " ORDER BY created_at, dataset_id", args)
        return [DatasetVersion(r["dataset_id"], r["policy_id"], r["device_id"], r["sha256"], r["rows"],
                               r["columns"], r["bytes"], json.loads(r["provenance"]), r["created_at"])
                for r in found]

    def export_npz(self, dataset_id: str) -> bytes:
        """The version's archive (`x`, `confidence`, `labels`, `meta`). Raises `NotFound`."""
        with self.database.read() as db:
            archive = db.scalar("SELECT archive FROM dataset_versions WHERE dataset_id = :id",
                                {"id": dataset_id})
        if archive is None:
            raise NotFound(f"no dataset version {dataset_id!r}")
        return _with_labels(bytes(archive))
