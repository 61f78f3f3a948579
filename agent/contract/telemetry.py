"""The telemetry report: what a device sends about one interval, and how reports merge.

A report holds, per input feature and output, counts over the reference profile's bins
(so the fleet computes drift without raw data), moments, NaN and out-of-range counts,
category counts plus a bounded frequent-items list of unseen categories, a log-bucket latency
histogram, request/error/rejected counts and resource use. Reports are *mergeable*: counts
add, minima/maxima combine, frequent items merge (Misra-Gries), so a queue that overflows on
the device or a fleet window over many devices is just `merge_reports`.

The wire encoding is in `agent.contract.telemetry_codec`.

Pure: no I/O, no clock. Imported by both the agent and the fleet.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace

import numpy as np

from agent.contract.manifest import ReferenceProfile
from agent.contract.performance import (
    PerformanceSketch,
    copy_performance,
    merge_performance_into,
)
from agent.errors import MessageError

TELEMETRY_SCHEMA_VERSION = 1
FREQUENT_ITEMS_K = 16

# Latency histogram: bucket 0 is < LATENCY_MIN_S, bucket i (1..N-2) is
# [MIN * 2^((i-1)/PER_OCTAVE), MIN * 2^(i/PER_OCTAVE)), the last bucket is everything above.
LATENCY_MIN_S = 1e-6
LATENCY_BUCKETS_PER_OCTAVE = 4
LATENCY_BUCKETS = 2 + 27 * LATENCY_BUCKETS_PER_OCTAVE  # 1 µs .. ~134 s



def category_labels(values: np.ndarray) -> np.ndarray:
    """Render category values as labels: integral numbers as `"3"`, other numbers by `repr`,
    strings as is, NaN/None as `""` (not a category). The profile and the sketch both use it."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(np.asarray(values, dtype=object).tolist()):
        if v is None:
            out[i] = ""
        elif isinstance(v, str):
            out[i] = v
        elif isinstance(v, bytes):
            out[i] = v.decode("utf-8", "replace")
        elif isinstance(v, bool | int):
            out[i] = str(int(v))
        else:
            f = float(v)
            out[i] = "" if math.isnan(f) else (str(int(f)) if f.is_integer() else repr(f))
    return out


def profile_digest(profile: ReferenceProfile) -> str:
    """Short digest of a reference profile (its canonical JSON): reports carry it as
    `profile_id` so the fleet can tell counts binned by other edges of the same shape."""
    doc = profile.model_dump(mode="json")
    if doc.get("performance") is None:  # bundles built before the field keep their digest
        doc.pop("performance", None)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


#: From here on every duration is in the last bucket (what the formula gives, without overflow).
_LAST_BUCKET_FROM_S = LATENCY_MIN_S * 2.0 ** (LATENCY_BUCKETS / LATENCY_BUCKETS_PER_OCTAVE)


def latency_bucket(latency_s: float) -> int:
    """The latency histogram bucket of one duration (seconds)."""
    if not latency_s >= LATENCY_MIN_S:  # also catches NaN
        return 0
    if latency_s >= _LAST_BUCKET_FROM_S:  # also inf, and values whose ratio below overflows
        return LATENCY_BUCKETS - 1
    i = 1 + math.floor(math.log2(latency_s / LATENCY_MIN_S) * LATENCY_BUCKETS_PER_OCTAVE)
    return min(i, LATENCY_BUCKETS - 1)


def latency_bucket_counts(latencies_s: np.ndarray) -> np.ndarray:
    """Per bucket, how many of `latencies_s` fall in it: `latency_bucket` of each, counted,
    in a few array operations. Values within a hair of a bucket's edge are put through
    `latency_bucket` itself, so the counts are exactly what one call per value gives."""
    lat = np.asarray(latencies_s, dtype=np.float64).ravel()
    idx = np.zeros(lat.shape, dtype=np.intp)
    ok = lat >= LATENCY_MIN_S  # False for NaN, as in latency_bucket
    ok[ok] = lat[ok] < _LAST_BUCKET_FROM_S  # the last bucket's, as latency_bucket (and inf) say
    idx[lat >= _LAST_BUCKET_FROM_S] = LATENCY_BUCKETS - 1
    if ok.any():
        pos = np.log2(lat[ok] / LATENCY_MIN_S) * LATENCY_BUCKETS_PER_OCTAVE
        low = np.floor(pos)
        idx[ok] = np.minimum(1 + low, LATENCY_BUCKETS - 1).astype(np.intp)
        near = np.flatnonzero(ok)[(pos - low < 1e-9) | (low + 1 - pos < 1e-9)]
        for j in near:  # where another log2 might round to the other side of the edge
            idx[j] = latency_bucket(float(lat[j]))
    return np.bincount(idx, minlength=LATENCY_BUCKETS)


def latency_bucket_upper(i: int) -> float:
    """Upper bound (seconds) of latency bucket `i` (inf for the last)."""
    if i >= LATENCY_BUCKETS - 1:
        return math.inf
    return LATENCY_MIN_S * 2.0 ** (i / LATENCY_BUCKETS_PER_OCTAVE)


@dataclass
class NumericSketch:
    """Counts over `[underflow, bin_0 .. bin_{B-1}, overflow]` (len(edges) + 1) plus moments
    of the finite values; `min`/`max` are +inf/-inf while empty."""

    counts: np.ndarray
    nan_count: int = 0
    min: float = math.inf
    max: float = -math.inf
    sum: float = 0.0
    sum_sq: float = 0.0

    @property
    def n(self) -> int:
        """Finite values seen (NaN excluded)."""
        return int(self.counts.sum())


@dataclass
class CategoricalSketch:
    """Counts over the vocabulary plus one last entry for unseen categories; `unseen` holds
    the most frequent unseen labels (Misra-Gries, counts underestimate by <= `unseen_error`)."""

    counts: np.ndarray
    nan_count: int = 0
    unseen: dict[str, int] = field(default_factory=dict)
    unseen_error: int = 0

    @property
    def n(self) -> int:
        return int(self.counts.sum())


FeatureSketch = NumericSketch | CategoricalSketch


@dataclass
class Resources:
    """Process resource use over the interval: peak RSS and CPU seconds spent."""

    rss_max_bytes: int = 0
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0


@dataclass
class TelemetryReport:
    """One device's telemetry for one interval of one model version (see module docstring)."""

    device_id: str
    seq: int
    model: str
    version: str
    interval_start: float
    interval_end: float
    features: list[FeatureSketch]
    outputs: list[FeatureSketch]
    latency_counts: np.ndarray = field(default_factory=lambda: np.zeros(LATENCY_BUCKETS, np.int64))
    latency_sum_s: float = 0.0
    latency_max_s: float = 0.0
    requests: int = 0
    errors: int = 0
    rejected: int = 0
    dropped_reports: int = 0
    merged_reports: int = 1
    cohort: str = ""
    profile_id: str = ""
    resources: Resources = field(default_factory=Resources)
    schema_version: int = TELEMETRY_SCHEMA_VERSION
    performance: PerformanceSketch | None = None  # labels and confidence; None in older reports


# ---------------------------------------------------------------------------- merging
def merge_frequent(
    a: dict[str, int], b: dict[str, int], k: int = FREQUENT_ITEMS_K
) -> tuple[dict[str, int], int]:
    """Merge two Misra-Gries summaries; returns (summary with <= k items, extra error)."""
    total = dict(a)
    for key, c in b.items():
        total[key] = total.get(key, 0) + c
    if len(total) <= k:
        return total, 0
    cut = sorted(total.values(), reverse=True)[k]
    return {key: c - cut for key, c in total.items() if c > cut}, cut


def _merge_feature(a: FeatureSketch, b: FeatureSketch) -> FeatureSketch:
    if type(a) is not type(b) or a.counts.shape != b.counts.shape:
        raise MessageError("cannot merge sketches binned differently (profile mismatch)")
    counts = np.add(a.counts, b.counts, dtype=np.int64)
    if isinstance(a, NumericSketch) and isinstance(b, NumericSketch):
        return NumericSketch(
            counts, a.nan_count + b.nan_count, min(a.min, b.min), max(a.max, b.max),
            a.sum + b.sum, a.sum_sq + b.sum_sq,
        )
    assert isinstance(a, CategoricalSketch) and isinstance(b, CategoricalSketch)
    unseen, err = merge_frequent(a.unseen, b.unseen)
    return CategoricalSketch(counts, a.nan_count + b.nan_count, unseen, a.unseen_error + b.unseen_error + err)


def _check_mergeable(a: TelemetryReport, b: TelemetryReport) -> None:
    if (a.model, a.version) != (b.model, b.version) or len(a.features) != len(b.features) or len(
        a.outputs
    ) != len(b.outputs):
        raise MessageError("cannot merge reports of different models or profiles")


def merge_into(acc: TelemetryReport, b: TelemetryReport) -> None:
    """Add `b` into the accumulator `acc` in place (what `merge_reports` computes, without
    allocating new sketches: the fleet's windows fold thousands of reports). `acc` must own
    its arrays (e.g. a decoded report, or one `merge_reports` returned). Raises
    `MessageError` when the reports are binned differently; `acc` is unchanged then."""
    _check_mergeable(acc, b)
    pairs = list(zip(acc.features + acc.outputs, b.features + b.outputs, strict=True))
    for x, y in pairs:
        if type(x) is not type(y) or x.counts.shape != y.counts.shape:
            raise MessageError("cannot merge sketches binned differently (profile mismatch)")
    if acc.performance is not None and b.performance is not None:
        merge_performance_into(acc.performance, b.performance)  # checks shapes before changing
    elif b.performance is not None:  # a report without the field counts as zero
        acc.performance = copy_performance(b.performance)
    for x, y in pairs:
        x.counts += y.counts
        x.nan_count += y.nan_count
        if isinstance(x, NumericSketch) and isinstance(y, NumericSketch):
            x.min, x.max = min(x.min, y.min), max(x.max, y.max)
            x.sum += y.sum
            x.sum_sq += y.sum_sq
        elif isinstance(x, CategoricalSketch) and isinstance(y, CategoricalSketch):
            x.unseen, err = merge_frequent(x.unseen, y.unseen)
            x.unseen_error += y.unseen_error + err
    acc.interval_start = min(acc.interval_start, b.interval_start)
    acc.interval_end = max(acc.interval_end, b.interval_end)
    acc.latency_counts += b.latency_counts
    acc.latency_sum_s += b.latency_sum_s
    acc.latency_max_s = max(acc.latency_max_s, b.latency_max_s)
    acc.requests += b.requests
    acc.errors += b.errors
    acc.rejected += b.rejected
    acc.dropped_reports += b.dropped_reports
    acc.merged_reports += b.merged_reports
    acc.resources = Resources(
        max(acc.resources.rss_max_bytes, b.resources.rss_max_bytes),
        acc.resources.cpu_user_s + b.resources.cpu_user_s,
        acc.resources.cpu_system_s + b.resources.cpu_system_s,
    )


def merge_reports(a: TelemetryReport, b: TelemetryReport) -> TelemetryReport:
    """Merge two reports of the same model version and profile (counts add) into a new one
    that keeps `a`'s identity (device, seq) and spans both intervals. Raises `MessageError`
    when the reports are binned differently."""
    def own(x: FeatureSketch) -> FeatureSketch:
        if isinstance(x, CategoricalSketch):
            return replace(x, counts=x.counts.astype(np.int64), unseen=dict(x.unseen))
        return replace(x, counts=x.counts.astype(np.int64))

    acc = replace(a, features=[own(x) for x in a.features], outputs=[own(x) for x in a.outputs],
                  latency_counts=a.latency_counts.astype(np.int64),
                  performance=None if a.performance is None else copy_performance(a.performance))
    merge_into(acc, b)
    return acc
