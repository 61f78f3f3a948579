"""The prediction log: remember what was predicted, so a label sent later can be matched.

Why a ring of numpy arrays: an application may label a prediction minutes or hours later,
or never; the device must stay bounded whatever it does. Every served row gets the next
sequence number `n` and lives in slot `n % capacity` until `capacity` newer rows overwrite it,
so memory is fixed (about 26 bytes a row: 64k rows ≈ 1.7 MB) and lookups are O(1). A
prediction id is `"<epoch>-<n>"`, `epoch` being 8 random hex digits per log (per agent start):
ids from before a restart, or made up, are *unknown*; ids overwritten by newer rows, or
labelled after `horizon_s`, are *expired*; a second label for the same row is a *duplicate*.
None of these is an error: each is counted and reported in the telemetry report.

Pending predictions are kept in memory only (not on disk): a restart forgets them, and their
labels count as unknown. Clock injectable (monotonic by default: horizons measure elapsed time).
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import MisuseError

MAX_BUNDLES = 255  # distinct bundles a log remembers before it forgets every older row


@dataclass(frozen=True)
class FeedbackConfig:
    """How many predictions are remembered, for how long, and how many labels one call may carry."""

    capacity: int = 65536
    horizon_s: float = 24 * 3600.0
    max_batch: int = 4096

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.max_batch < 1 or not self.horizon_s > 0:
            raise MisuseError("feedback: capacity, max_batch and horizon_s must be positive")


@dataclass
class Matched:
    """The labels of one bundle matched in one call: prediction ids, predictions and labels,
    row-aligned (the ids let a held collection sample attach its rows' labels)."""

    predicted: list[float] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


@dataclass
class FeedbackOutcome:
    """Counts of one feedback call, and the matched pairs by bundle id."""

    matched: int = 0
    unknown: int = 0
    expired: int = 0
    duplicate: int = 0
    invalid: int = 0
    pairs: dict[str, Matched] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"matched": self.matched, "unknown": self.unknown, "expired": self.expired,
                "duplicate": self.duplicate, "invalid": self.invalid}


def _label(value: object) -> float | None:
    """A label as a finite float, or None (bools, text, NaN and the like are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


class PredictionLog:
    """Bounded ring of served predictions; thread-safe (see module docstring)."""

    def __init__(self, config: FeedbackConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 epoch: str | None = None) -> None:
        self.config = config or FeedbackConfig()
        self.epoch = epoch or secrets.token_hex(4)
        self._clock = clock
        n = self.config.capacity
        # Each column is a numpy array (zeroed pages the kernel maps only when first written,
        # so an idle ring costs no RSS) with a memoryview over the same memory: a one-row
        # record (every request's) stores through the view, about a fifth of numpy's scalar
        # store; batches and `match` use the arrays.
        self._t = np.zeros(n, np.float64)
        self._pred = np.zeros(n, np.float64)
        self._bundle = np.zeros(n, np.uint8)
        self._labelled = np.zeros(n, np.bool_)
        # (typed Any: typeshed's memoryview takes only ints, these take floats and bools too)
        self._t_a: Any = self._t.data
        self._pred_a: Any = self._pred.data
        self._bundle_a: Any = self._bundle.data
        self._labelled_a: Any = self._labelled.data
        self._bundles: list[str] = []
        self._next = 0
        self._lock = threading.Lock()

    def _bundle_index(self, bundle_id: str) -> int:
        if self._bundles and self._bundles[-1] == bundle_id:  # the serving bundle: no search
            return len(self._bundles) - 1
        try:
            return self._bundles.index(bundle_id)
        except ValueError:
            if len(self._bundles) >= MAX_BUNDLES:  # rare (255 swaps): every older row expires
                self._bundles.clear()
                self._t[:] = -np.inf
            self._bundles.append(bundle_id)
            return len(self._bundles) - 1

    def record(self, bundle_id: str, predicted: np.ndarray) -> list[str]:
        """Remember one batch of predictions (one value per row); returns their ids in row order."""
        values = predicted.ravel() if isinstance(predicted, np.ndarray) else np.asarray(predicted).ravel()
        rows = values.size
        one = float(values[0]) if rows == 1 else 0.0
        with self._lock:
            b = self._bundle_index(bundle_id)
            first = self._next
            if rows == 1:  # the common request: scalar stores, not fancy indexing
                slot = first % self.config.capacity
                self._t_a[slot] = self._clock()
                self._pred_a[slot] = one
                self._bundle_a[slot] = b
                self._labelled_a[slot] = False
            else:
                slots = np.arange(first, first + rows) % self.config.capacity
                self._t[slots] = self._clock()
                self._pred[slots] = values
                self._bundle[slots] = b
                self._labelled[slots] = False
            self._next += rows
        if rows == 1:
            return [f"{self.epoch}-{first}"]
        return [f"{self.epoch}-{n}" for n in range(first, first + rows)]

    def reserve(self, rows: int) -> int:
        """Take the next `rows` sequence numbers (consecutive) for predictions that `fill`
        stores later, in a batch: a label for one of them before then counts as expired."""
        with self._lock:
            first = self._next
            cap = self.config.capacity
            if rows == 1:
                self._t_a[first % cap] = -math.inf
            else:
                self._t[np.arange(first, first + rows) % cap] = -np.inf
            self._next += rows
        return first

    def fill(self, bundle_id: str, seqs: np.ndarray, predicted: np.ndarray, times: np.ndarray) -> None:
        """Store reserved rows: sequence `seqs[i]` predicted `predicted[i]` at `times[i]` (the
        log's clock). Rows overwritten since they were reserved are left to the newer ones."""
        with self._lock:
            b = self._bundle_index(bundle_id)
            live = seqs >= self._next - self.config.capacity
            slots = seqs[live] % self.config.capacity
            self._t[slots] = times[live]
            self._pred[slots] = np.asarray(predicted, dtype=np.float64).ravel()[live]
            self._bundle[slots] = b
            self._labelled[slots] = False

    def ids(self, first: int, rows: int) -> list[str]:
        """The prediction ids of sequences `first .. first + rows - 1`."""
        if rows == 1:
            return [f"{self.epoch}-{first}"]
        return [f"{self.epoch}-{n}" for n in range(first, first + rows)]

    def now(self) -> float:
        """The log's clock (what `fill`'s times are read from)."""
        return self._clock()

    def match(self, items: Sequence[tuple[object, object]],
              accepts: Callable[[str, float], bool] | None = None) -> FeedbackOutcome:
        """Match `(prediction_id, label)` pairs. Never raises for bad items: each is counted.
        `accepts(bundle_id, label)` may refuse a label its model cannot use (a class index out
        of range): it counts as invalid and leaves the row open for a correct label.
        Raises `MisuseError` only for a batch over `max_batch` (the caller's 413)."""
        if len(items) > self.config.max_batch:
            raise MisuseError(f"{len(items)} labels in one call, the limit is {self.config.max_batch}")
        out = FeedbackOutcome()
        prefix = self.epoch + "-"
        with self._lock:
            now = self._clock()
            for pid, raw in items:
                label = _label(raw)
                if not isinstance(pid, str) or not pid.startswith(prefix) or not pid[len(prefix):].isdigit():
                    out.unknown += 1
                    continue
                n = int(pid[len(prefix):])
                if n >= self._next:
                    out.unknown += 1
                    continue
                slot = n % self.config.capacity
                if n < self._next - self.config.capacity or now - self._t[slot] > self.config.horizon_s:
                    out.expired += 1
                    continue
                if self._labelled[slot]:
                    out.duplicate += 1
                    continue
                bundle = self._bundles[int(self._bundle[slot])]
                if label is None or (accepts is not None and not accepts(bundle, label)):
                    out.invalid += 1
                    continue
                self._labelled[slot] = True
                pair = out.pairs.setdefault(bundle, Matched())
                pair.predicted.append(float(self._pred[slot]))
                pair.labels.append(label)
                pair.ids.append(pid)
                out.matched += 1
        return out
