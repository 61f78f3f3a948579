"""The telemetry report: what a device sends about one interval, and its compact encoding.

A report holds, per input feature and output, counts over the reference profile's bins
(so the fleet computes drift without raw data), moments, NaN and out-of-range counts,
category counts plus a bounded frequent-items list of unseen categories, a log-bucket latency
histogram, request/error/rejected counts and resource use. Reports are *mergeable*: counts
add, minima/maxima combine, frequent items merge (Misra-Gries), so a queue that overflows on
the device or a fleet window over many devices is just `merge_reports`.

Wire format (see docs/telemetry.md): one flag byte (bit 0 = zstd; other bits must be 0),
then a CBOR array (zstd-compressed when that is smaller). Count arrays travel as raw bytes
in the smallest unsigned dtype that holds their maximum. Decoding is bounded in input size,
decompressed size and element counts, and raises `MessageError` on anything malformed.

Pure: no I/O, no clock. Imported by both the agent and the fleet.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import cbor2
import numpy as np
import zstandard

from agent.errors import MessageError

TELEMETRY_SCHEMA_VERSION = 1
FLAG_ZSTD = 0x01
MAX_REPORT_BYTES = 256 * 1024
MAX_DECOMPRESSED_BYTES = 4 * 1024 * 1024
MAX_FEATURES = 4096
MAX_OUTPUTS = 256
MAX_BINS = 4100  # vocabulary (4096) + unseen, or edges (1025) + under/overflow
MAX_FREQUENT_ITEMS = 64
MAX_LABEL_CHARS = 128
MAX_TEXT_CHARS = 256
FREQUENT_ITEMS_K = 16
ZSTD_LEVEL = 3
ZSTD_MIN_BYTES = 128  # below this, compression rarely pays for its frame header

# Latency histogram: bucket 0 is < LATENCY_MIN_S, bucket i (1..N-2) is
# [MIN * 2^((i-1)/PER_OCTAVE), MIN * 2^(i/PER_OCTAVE)), the last bucket is everything above.
LATENCY_MIN_S = 1e-6
LATENCY_BUCKETS_PER_OCTAVE = 4
LATENCY_BUCKETS = 2 + 27 * LATENCY_BUCKETS_PER_OCTAVE  # 1 µs .. ~134 s

_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


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


def latency_bucket(latency_s: float) -> int:
    """The latency histogram bucket of one duration (seconds)."""
    if not latency_s >= LATENCY_MIN_S:  # also catches NaN
        return 0
    i = 1 + math.floor(math.log2(latency_s / LATENCY_MIN_S) * LATENCY_BUCKETS_PER_OCTAVE)
    return min(i, LATENCY_BUCKETS - 1)


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


def merge_reports(a: TelemetryReport, b: TelemetryReport) -> TelemetryReport:
    """Merge two reports of the same model version and profile (counts add). The result keeps
    `a`'s identity (device, seq) and spans both intervals. Raises `MessageError` when the
    reports are binned differently."""
    if (a.model, a.version) != (b.model, b.version) or len(a.features) != len(b.features) or len(
        a.outputs
    ) != len(b.outputs):
        raise MessageError("cannot merge reports of different models or profiles")
    return TelemetryReport(
        device_id=a.device_id,
        seq=a.seq,
        model=a.model,
        version=a.version,
        interval_start=min(a.interval_start, b.interval_start),
        interval_end=max(a.interval_end, b.interval_end),
        features=[_merge_feature(x, y) for x, y in zip(a.features, b.features, strict=True)],
        outputs=[_merge_feature(x, y) for x, y in zip(a.outputs, b.outputs, strict=True)],
        latency_counts=np.add(a.latency_counts, b.latency_counts, dtype=np.int64),
        latency_sum_s=a.latency_sum_s + b.latency_sum_s,
        latency_max_s=max(a.latency_max_s, b.latency_max_s),
        requests=a.requests + b.requests,
        errors=a.errors + b.errors,
        rejected=a.rejected + b.rejected,
        dropped_reports=a.dropped_reports + b.dropped_reports,
        merged_reports=a.merged_reports + b.merged_reports,
        cohort=a.cohort,
        profile_id=a.profile_id,
        resources=Resources(
            max(a.resources.rss_max_bytes, b.resources.rss_max_bytes),
            a.resources.cpu_user_s + b.resources.cpu_user_s,
            a.resources.cpu_system_s + b.resources.cpu_system_s,
        ),
    )


# ---------------------------------------------------------------------------- encoding
def _pack(counts: np.ndarray) -> list[Any]:
    top = int(counts.max()) if counts.size else 0
    width = 1 if top < 2**8 else 2 if top < 2**16 else 4 if top < 2**32 else 8
    return [width, counts.astype(_DTYPES[width]).tobytes()]


def _block_to_wire(sketches: list[FeatureSketch]) -> list[Any]:
    """Column-wise layout: one byte per sketch kind, all counts in one packed array (split by
    a packed length array), NaN counts packed, min/max as float32 when exact, sums float64,
    then per categorical sketch its frequent unseen items. Few large byte strings compress
    well and decode with a handful of `np.frombuffer` calls."""
    nums = [x for x in sketches if isinstance(x, NumericSketch)]
    cats = [x for x in sketches if isinstance(x, CategoricalSketch)]
    counts = np.concatenate([x.counts for x in sketches]) if sketches else np.zeros(0, np.int64)
    minmax = np.array([v for x in nums for v in (x.min, x.max)], dtype=np.float64)
    with np.errstate(over="ignore"):
        narrow = minmax.astype(np.float32)
    exact = bool(np.array_equal(narrow.astype(np.float64), minmax))
    extras = []
    for c in cats:
        items = sorted(c.unseen.items())
        extras.append([[k for k, _ in items], [v for _, v in items], c.unseen_error])
    return [
        bytes(0 if isinstance(x, NumericSketch) else 1 for x in sketches),
        _pack(np.array([x.counts.size for x in sketches], dtype=np.int64)),
        _pack(counts),
        _pack(np.array([x.nan_count for x in sketches], dtype=np.int64)),
        [4, narrow.tobytes()] if exact else [8, minmax.tobytes()],
        np.array([v for x in nums for v in (x.sum, x.sum_sq)], dtype=np.float64).tobytes(),
        extras,
    ]


def encode_report(report: TelemetryReport) -> bytes:
    """Encode a report: flag byte + CBOR, zstd-compressed when that is smaller. Pure."""
    body = [
        report.schema_version, report.device_id, report.seq, report.model, report.version,
        report.cohort, report.profile_id, report.interval_start, report.interval_end,
        report.requests, report.errors, report.rejected, report.dropped_reports, report.merged_reports,
        _block_to_wire(report.features),
        _block_to_wire(report.outputs),
        [*_pack(report.latency_counts), report.latency_sum_s, report.latency_max_s],
        [report.resources.rss_max_bytes, report.resources.cpu_user_s, report.resources.cpu_system_s],
    ]
    raw = cbor2.dumps(body, canonical=True)
    if len(raw) >= ZSTD_MIN_BYTES:
        packer = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True)
        packed = packer.compress(raw)
        if len(packed) < len(raw):
            return bytes([FLAG_ZSTD]) + packed
    return b"\x00" + raw


def _int(v: Any, what: str, hi: int = 2**63 - 1) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise MessageError(f"{what}: expected an integer in 0..{hi}, got {type(v).__name__}")
    return v


def _float(v: Any, what: str, finite: bool = False) -> float:
    if type(v) not in (float, int) or (finite and not math.isfinite(v)):
        raise MessageError(f"{what}: expected a {'finite ' if finite else ''}number")
    return float(v)


def _text(v: Any, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise MessageError(f"{what}: expected text of at most {limit} characters")
    return v


def _list(v: Any, what: str, n: int | None = None, limit: int = MAX_FEATURES) -> list[Any]:
    if not isinstance(v, list) or (n is not None and len(v) != n) or len(v) > limit:
        raise MessageError(f"{what}: expected a list{f' of {n}' if n is not None else ''} (<= {limit})")
    return v


def _unpack(width: Any, blob: Any, what: str, limit: int = MAX_BINS) -> np.ndarray:
    if width not in _DTYPES or not isinstance(blob, bytes) or len(blob) % width:
        raise MessageError(f"{what}: bad packed counts")
    if len(blob) // width > limit:
        raise MessageError(f"{what}: too many bins")
    return np.frombuffer(blob, dtype=_DTYPES[width]).astype(np.int64)


def _floats(v: Any, what: str, n: int) -> np.ndarray:
    if isinstance(v, list) and len(v) == 2 and v[0] in (4, 8):
        width, blob = v
    else:
        width, blob = 8, v
    if not isinstance(blob, bytes) or len(blob) != n * width:
        raise MessageError(f"{what}: expected {n} packed floats")
    return np.frombuffer(blob, dtype=np.float32 if width == 4 else np.float64).astype(np.float64)


def _block_from_wire(v: Any, what: str, limit: int) -> list[FeatureSketch]:
    v = _list(v, what, n=7)
    kinds = v[0]
    if not isinstance(kinds, bytes) or len(kinds) > limit or kinds.strip(b"\x00\x01"):
        raise MessageError(f"{what}: bad sketch kinds")
    k = len(kinds)
    packed = [_list(v[i], f"{what}[{i}]", n=2) for i in (1, 2, 3)]
    lengths = _unpack(packed[0][0], packed[0][1], f"{what}.lengths", limit)
    counts = _unpack(packed[1][0], packed[1][1], f"{what}.counts", limit * MAX_BINS)
    nans = _unpack(packed[2][0], packed[2][1], f"{what}.nan", limit)
    if (lengths > MAX_BINS).any():
        raise MessageError(f"{what}: too many bins in one sketch")
    if lengths.size != k or nans.size != k or int(lengths.sum()) != counts.size:
        raise MessageError(f"{what}: sketch sizes do not add up")
    n_num = kinds.count(0)
    minmax = _floats(v[4], f"{what}.minmax", 2 * n_num)
    sums = _floats(v[5], f"{what}.sums", 2 * n_num)
    if not np.isfinite(sums).all():
        raise MessageError(f"{what}: sums must be finite")
    extras = _list(v[6], f"{what}.categorical", n=k - n_num)
    ends = np.cumsum(lengths).tolist()
    parts = [counts[e - n : e] for e, n in zip(ends, lengths.tolist(), strict=True)]
    out: list[FeatureSketch] = []
    num_i = cat_i = 0
    for i, kind in enumerate(kinds):
        if kind == 0:
            j = 2 * num_i
            out.append(NumericSketch(parts[i], int(nans[i]), float(minmax[j]), float(minmax[j + 1]),
                                     float(sums[j]), float(sums[j + 1])))
            num_i += 1
        else:
            x = _list(extras[cat_i], f"{what}.categorical", n=3)
            keys = _list(x[0], f"{what}.unseen", limit=MAX_FREQUENT_ITEMS)
            vals = _list(x[1], f"{what}.unseen", n=len(keys))
            unseen = {
                _text(key, f"{what}.unseen", MAX_LABEL_CHARS): _int(c, f"{what}.unseen")
                for key, c in zip(keys, vals, strict=True)
            }
            out.append(CategoricalSketch(parts[i], int(nans[i]), unseen, _int(x[2], f"{what}.unseen_error")))
            cat_i += 1
    return out


def _inflate(data: bytes, max_decompressed: int) -> bytes:
    """Decompress one zstd frame whose header declares a size within the bound. zstd itself
    refuses output beyond the declared size, so a lying header cannot inflate further."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared < 0:
            raise MessageError("report: zstd frame without a declared content size")
        if declared > max_decompressed:
            raise MessageError(f"report: decompresses to more than {max_decompressed} bytes")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        raw = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise MessageError(f"report: corrupt zstd payload ({exc})") from None
    if not dobj.eof or dobj.unused_data or len(raw) != declared:
        raise MessageError("report: truncated zstd frame or trailing bytes after it")
    return raw


def decode_report(
    data: bytes, max_bytes: int = MAX_REPORT_BYTES, max_decompressed: int = MAX_DECOMPRESSED_BYTES
) -> TelemetryReport:
    """Decode and validate untrusted report bytes. Pure.

    Raises `MessageError` on an empty, oversized, truncated, corrupt or malformed payload, an
    unknown flag or schema version, or a payload inflating beyond `max_decompressed` bytes.
    It does not check the counts against a profile (see `check_report_shape`).
    """
    if not isinstance(data, bytes | bytearray | memoryview) or not 2 <= len(data) <= max_bytes:
        raise MessageError(f"report: size must be 2..{max_bytes} bytes")
    data = bytes(data)
    flags = data[0]
    if flags & ~FLAG_ZSTD:
        raise MessageError(f"report: unknown flags 0x{flags:02x}")
    raw = _inflate(data[1:], max_decompressed) if flags & FLAG_ZSTD else data[1:]
    fp = io.BytesIO(raw)
    try:
        body = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # cbor2 raises several types on bad input; all mean "malformed"
        raise MessageError(f"report: malformed CBOR ({type(exc).__name__})") from None
    if fp.tell() != len(raw):
        raise MessageError("report: trailing bytes after the CBOR body")
    b = _list(body, "report", n=18)
    if b[0] != TELEMETRY_SCHEMA_VERSION:
        raise MessageError(f"report: unsupported schema_version {b[0]!r}")
    lat = _list(b[16], "latency", n=4)
    res = _list(b[17], "resources", n=3)
    latency_counts = _unpack(lat[0], lat[1], "latency")
    if latency_counts.size != LATENCY_BUCKETS:
        raise MessageError(f"latency: expected {LATENCY_BUCKETS} buckets")
    report = TelemetryReport(
        device_id=_text(b[1], "device_id"), seq=_int(b[2], "seq"), model=_text(b[3], "model"),
        version=_text(b[4], "version"), cohort=_text(b[5], "cohort"), profile_id=_text(b[6], "profile_id"),
        interval_start=_float(b[7], "interval_start", finite=True),
        interval_end=_float(b[8], "interval_end", finite=True),
        requests=_int(b[9], "requests"), errors=_int(b[10], "errors"), rejected=_int(b[11], "rejected"),
        dropped_reports=_int(b[12], "dropped_reports"), merged_reports=_int(b[13], "merged_reports"),
        features=_block_from_wire(b[14], "features", MAX_FEATURES),
        outputs=_block_from_wire(b[15], "outputs", MAX_OUTPUTS),
        latency_counts=latency_counts,
        latency_sum_s=_float(lat[2], "latency.sum", finite=True),
        latency_max_s=_float(lat[3], "latency.max", finite=True),
        resources=Resources(
            _int(res[0], "resources.rss"), _float(res[1], "resources.cpu_user", finite=True),
            _float(res[2], "resources.cpu_system", finite=True),
        ),
    )
    if not report.device_id or report.interval_end < report.interval_start:
        raise MessageError("report: empty device_id or interval ends before it starts")
    return report


def check_report_shape(report: TelemetryReport, n_bins: list[int], n_output_bins: list[int]) -> None:
    """Check a decoded report's sketch sizes against a profile's: `n_bins[i]` is the expected
    count length of feature `i` (len(edges) + 1 numeric, len(vocabulary) + 1 categorical).
    Raises `MessageError` on a mismatch."""
    pairs = (("features", report.features, n_bins), ("outputs", report.outputs, n_output_bins))
    for what, sketches, sizes in pairs:
        if [s.counts.size for s in sketches] != list(sizes):
            raise MessageError(f"report {what} do not match the model's reference profile")
