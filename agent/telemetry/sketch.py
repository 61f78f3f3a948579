"""The device-side telemetry sketch: fold inference batches into counts over reference bins.

Folding must cost little next to inference, so one batch costs a few numpy calls: per numeric
column one `np.searchsorted` against the profile's edges, then a single `np.bincount` over
all columns at once (each column owns a slice `[underflow, bins.., overflow, non-finite]` of
one flat counter), and column-wise min/max/sum/sum-of-squares. Categorical columns (integer
codes in the model's input tensor) are matched to the vocabulary with a sorted lookup; unseen
codes feed a Misra-Gries frequent-items summary bounded at `frequent_k` labels.

`snapshot_and_reset()` returns a `TelemetryReport` (see `agent.contract.telemetry`) and starts
a new interval. Thread-safe: serving threads call `update`, the reporter calls the snapshot.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from collections.abc import Callable

import numpy as np

from agent.contract.manifest import FeatureProfile, ReferenceProfile
from agent.contract.telemetry import (
    FREQUENT_ITEMS_K,
    LATENCY_BUCKETS,
    CategoricalSketch,
    FeatureSketch,
    NumericSketch,
    Resources,
    TelemetryReport,
    category_labels,
    latency_bucket,
    latency_bucket_counts,
    merge_frequent,
    profile_digest,
)
from agent.errors import MisuseError
from agent.telemetry.performance import PerformanceFolder

ResourceProbe = Callable[[], tuple[int, float, float]]


def process_resources() -> tuple[int, float, float]:
    """(current RSS bytes, user CPU seconds, system CPU seconds) of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/self/statm", "rb") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = usage.ru_maxrss * 1024  # Linux reports KiB; peak rather than current
    return rss, usage.ru_utime, usage.ru_stime


class _NumericBlock:
    """All numeric columns of one tensor, folded together.

    Column `c` owns the slice `[underflow, bins.., overflow, non-finite]` (len(edges) + 2) of
    one flat counter. A batch is transposed, sorted per column, and each column's search keys
    `[-DBL_MAX, edges.., +inf]` are located in it with one `searchsorted`: consecutive
    differences of those positions are exactly the slice's counts, and min/max are read off
    the sorted rows. Sorting n values and searching ~100 keys is several times cheaper than
    searching n values one by one.
    """

    def __init__(self, profiles: list[tuple[int, FeatureProfile]]) -> None:
        self.columns = np.array([j for j, _ in profiles], dtype=np.intp)
        self.edges = [np.asarray(p.edges, dtype=np.float64) for _, p in profiles]
        lowest = np.finfo(np.float64).min
        self.keys = [np.concatenate([[lowest], e, [np.inf]]) for e in self.edges]
        sizes = np.array([len(e) + 2 for e in self.edges], dtype=np.intp)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        self.sizes = sizes
        self.last = self.offsets + sizes - 1
        self.total = int(sizes.sum())
        self._pos = np.empty(self.total, dtype=np.intp)
        self.reset()

    def reset(self) -> None:
        k = len(self.edges)
        self.counts = np.zeros(self.total, dtype=np.int64)
        self.min = np.full(k, np.inf)
        self.max = np.full(k, -np.inf)
        self.sum = np.zeros(k)
        self.sum_sq = np.zeros(k)

    def fold(self, data: np.ndarray) -> None:
        xt = np.array(data[:, self.columns].T, dtype=np.float64, order="C")
        xt.sort(axis=1)  # NaN sorts last, -inf first, +inf just before NaN
        n = xt.shape[1]
        pos = self._pos
        for c, keys in enumerate(self.keys):
            pos[self.offsets[c] : self.offsets[c] + self.sizes[c]] = np.searchsorted(xt[c], keys)
        lo, hi = pos[self.offsets], pos[self.last]  # first finite, one past the last finite
        delta = np.empty(self.total, dtype=np.int64)
        delta[:-1] = np.diff(pos)
        delta[self.last] = n - (hi - lo)
        self.counts += delta
        rows = np.arange(len(self.keys))
        some = hi > lo
        np.minimum(self.min, np.where(some, xt[rows, np.minimum(lo, n - 1)], np.inf), out=self.min)
        np.maximum(self.max, np.where(some, xt[rows, np.maximum(hi - 1, 0)], -np.inf), out=self.max)
        all_finite = not (lo.any() or (hi < n).any())
        xf = xt if all_finite else np.where(np.isfinite(xt), xt, 0.0)
        self.sum += xf.sum(axis=1)
        self.sum_sq += np.einsum("ij,ij->i", xf, xf)

    def sketches(self) -> list[NumericSketch]:
        out = []
        for c in range(len(self.edges)):
            s = self.counts[self.offsets[c] : self.offsets[c] + self.sizes[c]]
            out.append(
                NumericSketch(
                    s[:-1].copy(), int(s[-1]), float(self.min[c]), float(self.max[c]),
                    float(self.sum[c]), float(self.sum_sq[c]),
                )
            )
        return out


class _CategoricalColumn:
    """One categorical column: vocabulary counts + unseen frequent items (Misra-Gries)."""

    def __init__(self, column: int, profile: FeatureProfile, k: int) -> None:
        self.column = column
        self.k = k
        self.size = len(profile.vocabulary) + 1
        codes: list[tuple[float, int]] = []
        for i, label in enumerate(profile.vocabulary):
            try:
                codes.append((float(label), i))
            except ValueError:
                continue  # a non-numeric label cannot appear in a numeric tensor
        codes.sort()
        self.code_values = np.array([c for c, _ in codes], dtype=np.float64)
        self.code_index = np.array([i for _, i in codes], dtype=np.intp)
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros(self.size, dtype=np.int64)
        self.nan_count = 0
        self.unseen: dict[str, int] = {}
        self.unseen_error = 0

    def fold(self, data: np.ndarray) -> None:
        x = data[:, self.column].astype(np.float64, copy=False)
        nan = np.isnan(x)
        self.nan_count += int(nan.sum())
        x = x[~nan]
        if self.code_values.size:
            pos = np.clip(np.searchsorted(self.code_values, x), 0, self.code_values.size - 1)
            hit = self.code_values[pos] == x
        else:
            pos = np.zeros(x.shape, dtype=np.intp)
            hit = np.zeros(x.shape, dtype=bool)
        idx = np.where(hit, self.code_index[pos] if self.code_index.size else 0, self.size - 1)
        self.counts += np.bincount(idx, minlength=self.size)
        if not hit.all():
            values, counts = np.unique(x[~hit], return_counts=True)
            batch = dict(zip(category_labels(values).tolist(), counts.tolist(), strict=True))
            self.unseen, err = merge_frequent(self.unseen, batch, self.k)
            self.unseen_error += err

    def sketch(self) -> CategoricalSketch:
        return CategoricalSketch(self.counts.copy(), self.nan_count, dict(self.unseen), self.unseen_error)


class _Tensor:
    """The sketches of one tensor (the model input or its output).

    Small batches (one request = one row is typical) are copied into a row buffer and folded
    `buffer_rows` at a time, so the per-call cost is a row copy, not a sort and ~20 searches.
    """

    def __init__(self, profiles: list[FeatureProfile], k: int, buffer_rows: int,
                 on_fold: Callable[[np.ndarray], None] | None = None) -> None:
        self.width = len(profiles)
        self.on_fold = on_fold
        self.numeric = _NumericBlock([(j, p) for j, p in enumerate(profiles) if p.kind == "numeric"])
        self.categorical = [
            _CategoricalColumn(j, p, k) for j, p in enumerate(profiles) if p.kind == "categorical"
        ]
        self.order: list[tuple[str, int]] = []  # per profile position: ("n"|"c", index)
        counters = {"numeric": 0, "categorical": 0}
        for p in profiles:
            self.order.append((p.kind[0], counters[p.kind]))
            counters[p.kind] += 1
        self.buffer = np.empty((buffer_rows, self.width), dtype=np.float64)
        self.buffered = 0

    def add(self, data: np.ndarray, what: str) -> None:
        if data.ndim == 1:
            data = data.reshape(-1, 1) if self.width == 1 else data.reshape(1, -1)
        elif data.ndim > 2:
            data = data.reshape(data.shape[0], -1)
        if data.shape[1] != self.width:
            raise MisuseError(f"telemetry: {what} has {data.shape[1]} columns, the profile {self.width}")
        n = data.shape[0]
        if n * 2 >= len(self.buffer):
            self._fold(data)
            return
        if self.buffered + n > len(self.buffer):
            self.flush()
        self.buffer[self.buffered : self.buffered + n] = data
        self.buffered += n

    def flush(self) -> None:
        if self.buffered:
            self._fold(self.buffer[: self.buffered])
            self.buffered = 0

    def _fold(self, data: np.ndarray) -> None:
        if data.shape[0] == 0:
            return
        if self.numeric.edges:
            self.numeric.fold(data)
        for col in self.categorical:
            col.fold(data)
        if self.on_fold is not None:
            self.on_fold(data)

    def snapshot(self) -> list[FeatureSketch]:
        self.flush()
        nums = self.numeric.sketches()
        cats = [c.sketch() for c in self.categorical]
        out: list[FeatureSketch] = [nums[i] if kind == "n" else cats[i] for kind, i in self.order]
        self.numeric.reset()
        for c in self.categorical:
            c.reset()
        return out


class TelemetrySketch:
    """Mergeable per-interval telemetry of one model version on one device.

    `profile` is the bundle's reference profile (its edges and vocabularies fix the bins;
    reports carry its digest as `profile_id` unless one is given, "" for none);
    `clock` returns epoch seconds and `resource_probe` returns (RSS bytes, user CPU s,
    system CPU s), both injectable for tests.
    """

    def __init__(
        self,
        profile: ReferenceProfile,
        device_id: str,
        model: str,
        version: str,
        cohort: str = "",
        profile_id: str | None = None,
        first_seq: int = 0,
        frequent_k: int = FREQUENT_ITEMS_K,
        buffer_rows: int = 512,
        clock: Callable[[], float] = time.time,
        resource_probe: ResourceProbe = process_resources,
    ) -> None:
        if not device_id:
            raise MisuseError("telemetry: device_id must not be empty")
        self._lock = threading.Lock()
        self._inputs = _Tensor(list(profile.features), frequent_k, buffer_rows)
        self.performance = PerformanceFolder(profile)
        self._outputs = _Tensor(list(profile.outputs), frequent_k, buffer_rows, self.performance.fold_outputs)
        self.device_id, self.model, self.version = device_id, model, version
        self.cohort = cohort
        self.profile_id = profile_id if profile_id is not None else profile_digest(profile)
        self._next_seq = first_seq
        self._clock = clock
        self._probe = resource_probe
        self._start = clock()
        _, self._cpu_u, self._cpu_s = resource_probe()
        self._rss_max = 0
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._latency = np.zeros(LATENCY_BUCKETS, dtype=np.int64)
        self._latency_sum = 0.0
        self._latency_max = 0.0
        self._requests = self._errors = self._rejected = 0

    def update(
        self,
        batch_inputs: np.ndarray,
        batch_outputs: np.ndarray | None,
        latency_s: float,
        error: bool = False,
    ) -> None:
        """Fold one inference call: its input rows, its output rows (skipped when `None` or on
        error), its latency and whether it failed. Raises `MisuseError` when the arrays do not
        match the profile's columns."""
        x = np.asarray(batch_inputs)
        y = None if batch_outputs is None or error else np.asarray(batch_outputs)
        for what, arr in (("batch_inputs", x), ("batch_outputs", y)):
            if arr is not None and arr.dtype.kind not in "biuf":
                raise MisuseError(f"telemetry: {what} must be a numeric array, not {arr.dtype}")
        with self._lock:
            if self._inputs.width:
                self._inputs.add(x, "batch_inputs")
            if y is not None and self._outputs.width:
                self._outputs.add(y, "batch_outputs")
            self._requests += 1
            self._errors += int(error)
            self._latency[latency_bucket(latency_s)] += 1
            if math.isfinite(latency_s) and latency_s > 0:
                self._latency_sum += latency_s
                self._latency_max = max(self._latency_max, latency_s)

    def update_batch(
        self, batch_inputs: np.ndarray, batch_outputs: np.ndarray, latencies_s: list[float]
    ) -> None:
        """Fold several successful calls at once: their input and output rows concatenated,
        one latency per call. The same counts as one `update` per call, for a fraction of the
        cost (the serving path batches its bookkeeping this way). Raises as `update`."""
        x, y = np.asarray(batch_inputs), np.asarray(batch_outputs)
        for what, arr in (("batch_inputs", x), ("batch_outputs", y)):
            if arr.dtype.kind not in "biuf":
                raise MisuseError(f"telemetry: {what} must be a numeric array, not {arr.dtype}")
        with self._lock:
            if self._inputs.width:
                self._inputs.add(x, "batch_inputs")
            if self._outputs.width:
                self._outputs.add(y, "batch_outputs")
            self._requests += len(latencies_s)
            if len(latencies_s) < 8:  # the arrays' set-up costs more than a few calls
                for latency_s in latencies_s:
                    self._latency[latency_bucket(latency_s)] += 1
                    if math.isfinite(latency_s) and latency_s > 0:
                        self._latency_sum += latency_s
                        self._latency_max = max(self._latency_max, latency_s)
                return
            lat = np.asarray(latencies_s, dtype=np.float64)
            self._latency += latency_bucket_counts(lat)
            timed = lat[np.isfinite(lat) & (lat > 0)]
            if timed.size:  # the sum may differ from one update per call in its last bits
                self._latency_sum += float(timed.sum())
                self._latency_max = max(self._latency_max, float(timed.max()))

    def record_rejected(self, n: int = 1) -> None:
        """Count requests refused before inference (input validation, overload)."""
        with self._lock:
            self._rejected += n

    def fold_labels(self, predicted: np.ndarray, labels: np.ndarray) -> int:
        """Fold matched (prediction, label) pairs; returns the invalid ones (skipped, counted)."""
        with self._lock:
            return self.performance.fold_labels(predicted, labels)

    def count_feedback(self, outcome: str, n: int = 1) -> None:
        """Count labels that matched nothing (`unknown`, `expired`, `duplicate`, `invalid`)."""
        with self._lock:
            self.performance.count(outcome, n)

    def live_counts(self) -> tuple[int, int, int, np.ndarray, float]:
        """(requests, errors, rejected, latency histogram copy, latency sum) of the open interval,
        without closing it: the agent's /metrics adds them to the closed intervals' totals."""
        with self._lock:
            return self._requests, self._errors, self._rejected, self._latency.copy(), self._latency_sum

    def snapshot_and_reset(self) -> TelemetryReport:
        """The report of the interval since the last snapshot; starts a new interval."""
        with self._lock:
            now = self._clock()
            rss, cpu_u, cpu_s = self._probe()
            report = TelemetryReport(
                device_id=self.device_id, seq=self._next_seq, model=self.model, version=self.version,
                interval_start=self._start, interval_end=max(now, self._start),
                features=self._inputs.snapshot(), outputs=self._outputs.snapshot(),
                latency_counts=self._latency, latency_sum_s=self._latency_sum,
                latency_max_s=self._latency_max, requests=self._requests, errors=self._errors,
                rejected=self._rejected, cohort=self.cohort, profile_id=self.profile_id,
                resources=Resources(max(rss, self._rss_max), max(0.0, cpu_u - self._cpu_u),
                                    max(0.0, cpu_s - self._cpu_s)),
                performance=self.performance.snapshot_and_reset(),  # after the outputs' flush
            )
            self._next_seq += 1
            self._start, self._cpu_u, self._cpu_s, self._rss_max = now, cpu_u, cpu_s, 0
            self._reset_counters()
            return report
