"""Bounded, opt-in sample of served inputs, and its resumable upload in chunks.

Nothing is collected without a signed policy: `collector_from_director` is the only way to make
a `SampleCollector` from what the fleet sent, and it goes through `verify_director` (signature,
sequence, expiry, addressee); an unsigned, tampered, stale or foreign document, or one without
a `collect` policy, gives None. The collector keeps at most `capacity` rows (the policy's
`max_rows`, lowered so kept values fit `max_bytes`) and stops taking rows `max_seconds` after it
started: `reservoir` keeps a uniform sample of every row offered (Vitter's algorithm R, seeded),
`low_confidence` the rows with the lowest top-class confidence seen (a max-heap on confidence).
A row offered with its prediction id remembers it while it is kept (a replaced row forgets
it), and `label(ids, labels)` attaches the labels sent back for kept rows; the archive's
`labels` column is NaN for rows whose label never came (or came after the sample closed).

`ChunkUploader` cuts the finished `.npz` into the policy's chunk size and remembers, in a small
JSON file next to a copy of the archive, the first chunk not yet acknowledged: after a restart
or a lost connection the upload resumes there, and the fleet reassembles and checks the sha256.

The daemon drives them in `agent.daemon.collection` (docs/telemetry.md, *Data collection*).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import math
import time
from collections.abc import Callable, Collection
from datetime import datetime
from pathlib import Path

import numpy as np

from agent.contract.collect import CollectPolicy, DatasetChunk, encode_chunk
from agent.contract.director import DirectorTrust, verify_director
from agent.durable_io import write_durably
from agent.errors import DirectorError, MisuseError


class SampleCollector:
    """A bounded sample of one device's inputs under one policy (not thread-safe)."""

    def __init__(self, policy: CollectPolicy, width: int, device_id: str,
                 clock: Callable[[], float] = time.time) -> None:
        if width < 1:
            raise MisuseError("collect: rows need at least one column")
        self.policy, self.width, self.device_id = policy, width, device_id
        self.capacity = max(1, min(policy.max_rows, policy.max_bytes // (8 * width + 16)))
        self._clock = clock
        self.started = clock()
        self._rng = np.random.default_rng(policy.seed)
        self._rows = np.zeros((self.capacity, width), np.float64)
        self._conf = np.full(self.capacity, np.nan)
        self._labels = np.full(self.capacity, np.nan)
        self._id_at: list[str | None] = [None] * self.capacity  # prediction id of each kept row
        self._slot_of: dict[str, int] = {}
        self._kept = 0
        self.seen = 0
        self._heap: list[tuple[float, int]] = []  # (-confidence, slot): the most confident on top

    @property
    def kept(self) -> int:
        """Rows in the sample now."""
        return self._kept

    @property
    def open(self) -> bool:
        """Still taking rows (the time cap has not passed)."""
        return self._clock() - self.started < self.policy.max_seconds

    @property
    def labelled(self) -> int:
        """Kept rows that have a label."""
        return int(np.count_nonzero(~np.isnan(self._labels[: self._kept])))

    def offer(self, rows: np.ndarray, confidence: np.ndarray | None = None,
              ids: list[str] | None = None) -> None:
        """Consider served rows (and their top-class confidence, needed by `low_confidence`;
        their prediction ids, one per row, so a later label can join a kept row)."""
        if not self.open:
            return
        x = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
        if x.shape[1] != self.width:
            raise MisuseError(f"collect: rows have {x.shape[1]} columns, the sample {self.width}")
        conf = np.full(len(x), np.nan) if confidence is None else np.asarray(confidence, np.float64)
        if ids is not None and len(ids) != len(x):
            ids = None  # not one id per row: keep the rows, link none of them
        for i in range(len(x)):
            self.seen += 1
            pid = ids[i] if ids is not None else None
            if self.policy.strategy == "low_confidence":
                self._offer_hard(x[i], float(conf[i]), pid)
            elif self._kept < self.capacity:
                self._store(self._kept, x[i], conf[i], pid)
                self._kept += 1
            else:
                j = int(self._rng.integers(0, self.seen))
                if j < self.capacity:
                    self._store(j, x[i], conf[i], pid)

    def _offer_hard(self, row: np.ndarray, conf: float, pid: str | None) -> None:
        c = 1.0 if math.isnan(conf) else conf
        if self._kept < self.capacity:
            self._store(self._kept, row, c, pid)
            heapq.heappush(self._heap, (-c, self._kept))
            self._kept += 1
        elif c < -self._heap[0][0]:
            _, slot = heapq.heapreplace(self._heap, (-c, self._heap[0][1]))
            self._store(slot, row, c, pid)

    def _store(self, slot: int, row: np.ndarray, conf: float, pid: str | None) -> None:
        self._rows[slot] = row
        self._conf[slot] = conf
        self._labels[slot] = np.nan
        old = self._id_at[slot]
        if old is not None:
            del self._slot_of[old]
        self._id_at[slot] = pid
        if pid is not None:
            self._slot_of[pid] = slot

    def label(self, ids: list[str], labels: list[float]) -> int:
        """Attach labels (row-aligned with `ids`) to the kept rows served under those ids; ids
        of rows not kept (never sampled, or replaced since) are ignored. Returns rows labelled."""
        n = 0
        for pid, value in zip(ids, labels, strict=False):
            slot = self._slot_of.get(pid)
            if slot is not None and math.isfinite(value):
                self._labels[slot] = value
                n += 1
        return n

    def archive(self) -> bytes:
        """The sample as `.npz`: `x` (rows kept), `confidence`, `labels` (NaN: no label came
        back while the sample was held) and `meta` (JSON: policy, device, rows seen, kept and
        labelled, start and end time)."""
        meta = {"policy_id": self.policy.policy_id, "strategy": self.policy.strategy,
                "device_id": self.device_id, "seen": self.seen, "kept": self._kept,
                "labelled": self.labelled, "started": self.started, "ended": self._clock()}
        buf = io.BytesIO()
        np.savez(buf, x=self._rows[: self._kept], confidence=self._conf[: self._kept],
                 labels=self._labels[: self._kept],
                 meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8))
        return buf.getvalue()


def collector_from_director(
    envelope: bytes, trust: DirectorTrust, device_id: str, cohorts: Collection[str], last_sequence: int,
    now: datetime, width: int, clock: Callable[[], float] = time.time,
) -> SampleCollector | None:
    """A collector for the verified document's `collect` policy, or None: no policy, or a
    document that fails verification (unsigned, tampered, stale, expired, not ours)."""
    try:
        doc = verify_director(envelope, trust, device_id, cohorts, last_sequence, now)
    except DirectorError:
        return None
    if doc.collect is None:
        return None
    return SampleCollector(doc.collect, width, device_id, clock)


class ChunkUploader:
    """Resumable upload of one archive; progress persisted in `directory` (created)."""

    def __init__(self, directory: Path, policy: CollectPolicy, device_id: str, archive: bytes | None = None
                 ) -> None:
        self.directory, self.policy, self.device_id = directory, policy, device_id
        directory.mkdir(parents=True, exist_ok=True)
        self._blob = directory / f"{policy.policy_id}.npz"
        self._state = directory / f"{policy.policy_id}.json"
        if archive is not None:
            write_durably(self._blob, archive)
            write_durably(self._state, json.dumps({"next": 0}).encode())
        self.data = self._blob.read_bytes()
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.total = max(1, math.ceil(len(self.data) / policy.chunk_bytes))
        self.upload_id = self.sha256[:16]
        try:
            self.next_index = int(json.loads(self._state.read_bytes())["next"])
        except (OSError, ValueError, KeyError, TypeError):
            self.next_index = 0

    @property
    def done(self) -> bool:
        return self.next_index >= self.total

    def chunk(self, index: int) -> bytes:
        """The encoded chunk `index`."""
        size = self.policy.chunk_bytes
        part = self.data[index * size : (index + 1) * size]
        return encode_chunk(DatasetChunk(self.policy.policy_id, self.device_id, self.upload_id, index,
                                         self.total, self.sha256, part))

    def pending(self) -> list[tuple[int, bytes]]:
        """Chunks from the first unacknowledged one on."""
        return [(i, self.chunk(i)) for i in range(self.next_index, self.total)]

    def ack(self, index: int) -> None:
        """Chunk `index` was delivered (in order): persist the progress before moving on."""
        if index == self.next_index:
            self.next_index += 1
            write_durably(self._state, json.dumps({"next": self.next_index}).encode())
