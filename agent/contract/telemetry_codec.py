"""The telemetry report's wire encoding: bounded, strict decoding of what devices send.

Wire format (see docs/telemetry.md): one flag byte (bit 0 = zstd; other bits must be 0),
then a CBOR array (zstd-compressed when that is smaller). Count arrays travel as raw bytes
in the smallest unsigned dtype that holds their maximum. Decoding is bounded in input size,
decompressed size and element counts, and raises `MessageError` on anything malformed.

Pure: no I/O, no clock. Imported by both the agent and the fleet.
"""

from __future__ import annotations

import io
import math
import threading
from typing import Any

import cbor2
import numpy as np
import zstandard

from agent.contract.performance import decode_performance, encode_performance
from agent.contract.telemetry import (
    LATENCY_BUCKETS,
    TELEMETRY_SCHEMA_VERSION,
    CategoricalSketch,
    FeatureSketch,
    NumericSketch,
    Resources,
    TelemetryReport,
)
from agent.errors import MessageError

FLAG_ZSTD = 0x01
MAX_REPORT_BYTES = 256 * 1024
MAX_DECOMPRESSED_BYTES = 4 * 1024 * 1024
MAX_FEATURES = 4096
MAX_OUTPUTS = 256
MAX_BINS = 4100  # vocabulary (4096) + unseen, or edges (1025) + under/overflow
MAX_FREQUENT_ITEMS = 64
MAX_LABEL_CHARS = 128
MAX_TEXT_CHARS = 256
ZSTD_LEVEL = 9
ZSTD_MIN_BYTES = 128  # below this, compression rarely pays for its frame header
_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# ---------------------------------------------------------------------------- encoding
# Body: one CBOR array, column-wise so that a few large byte strings carry the data.
#  0 schema_version  1 device_id  2 seq  3 model  4 version  5 cohort  6 profile_id
#  7 interval_start  8 interval_end  9 requests  10 errors  11 rejected  12 dropped_reports
# 13 merged_reports  14 number of feature sketches (the rest are outputs)
# 15 kinds (bytes, 0 numeric / 1 categorical per sketch)  16 lengths [width, bytes]
# 17 counts [width, codec, bytes]: every sketch's counts, then the latency histogram, as
#    little-endian unsigned integers of `width` bytes, byte-shuffled (the low bytes of all
#    counts, then the next bytes...); codec 1 = in a zstd frame of its own (counts compress
#    far better alone than mixed with floats)
# 18 non-finite counts [width, bytes]  19 min/max [4|8, bytes] (float32 when exact)
# 20 mean/M2 per numeric sketch [4|8, bytes] (float32 unless out of its range)
# 21 per categorical sketch [unseen labels, their counts, error]
# 22 latency [sum_s, max_s]  23 resources [rss_max_bytes, cpu_user_s, cpu_system_s]
# 24 (optional, present only when the report has one) performance: see
#    agent.contract.performance.encode_performance. Reports without it still decode.
BODY_FIELDS = 24


def _pack(counts: np.ndarray) -> list[Any]:
    top = int(counts.max()) if counts.size else 0
    width = 1 if top < 2**8 else 2 if top < 2**16 else 4 if top < 2**32 else 8
    return [width, counts.astype(_DTYPES[width]).tobytes()]


_local = threading.local()


def _zstd(raw: bytes) -> bytes:
    """zstd frame with content size and checksum; one compressor per thread (creating one
    costs more than compressing a report, and they are not thread-safe)."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_content_size=True, write_checksum=True
        )
    return packer.compress(raw)


def encode_report(report: TelemetryReport) -> bytes:
    """Encode a report: flag byte + CBOR body (see the layout above), the whole zstd-compressed
    when that is smaller. Means and M2 travel as float32 (relative precision ~6e-8) unless
    they exceed its range. Pure."""
    sketches = [*report.features, *report.outputs]
    nums = [x for x in sketches if isinstance(x, NumericSketch)]
    counts = np.concatenate([*(x.counts for x in sketches), report.latency_counts])
    width, blob = _pack(counts)
    # Byte-shuffled (all low bytes, then the next bytes...): one large count no longer makes
    # every count cost `width` incompressible bytes, the high-byte planes are mostly zeros.
    blob = np.frombuffer(blob, dtype=np.uint8).reshape(-1, width).T.tobytes()
    packed = _zstd(blob) if len(blob) >= ZSTD_MIN_BYTES else blob
    codec = 1 if len(packed) < len(blob) else 0
    minmax = np.array([v for x in nums for v in (x.min, x.max)], dtype=np.float64)
    with np.errstate(over="ignore"):
        narrow = minmax.astype(np.float32)
    exact = bool(np.array_equal(narrow.astype(np.float64), minmax))
    moments = np.zeros(2 * len(nums), dtype=np.float64)
    for i, num in enumerate(nums):
        n = num.n
        if n:
            moments[2 * i : 2 * i + 2] = (num.sum / n, max(num.sum_sq - num.sum * num.sum / n, 0.0))
    with np.errstate(over="ignore"):
        moments32 = moments.astype(np.float32)
    fits = bool(np.array_equal(np.isfinite(moments32), np.isfinite(moments)))
    extras = []
    for x in sketches:
        if isinstance(x, CategoricalSketch):
            items = sorted(x.unseen.items())
            extras.append([[k for k, _ in items], [v for _, v in items], x.unseen_error])
    body = [
        report.schema_version, report.device_id, report.seq, report.model, report.version,
        report.cohort, report.profile_id, report.interval_start, report.interval_end,
        report.requests, report.errors, report.rejected, report.dropped_reports, report.merged_reports,
        len(report.features), bytes(0 if isinstance(x, NumericSketch) else 1 for x in sketches),
        _pack(np.array([x.counts.size for x in sketches], dtype=np.int64)),
        [width, codec, packed if codec else blob],
        _pack(np.array([x.nan_count for x in sketches], dtype=np.int64)),
        [4, narrow.tobytes()] if exact else [8, minmax.tobytes()],
        [4, moments32.tobytes()] if fits else [8, moments.tobytes()],
        extras, [report.latency_sum_s, report.latency_max_s],
        [report.resources.rss_max_bytes, report.resources.cpu_user_s, report.resources.cpu_system_s],
    ]
    if report.performance is not None:
        body.append(encode_performance(report.performance))
    raw = cbor2.dumps(body, canonical=True)
    if len(raw) >= ZSTD_MIN_BYTES:
        whole = _zstd(raw)
        if len(whole) < len(raw):
            return bytes([FLAG_ZSTD]) + whole
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


def _unpack(v: Any, what: str, limit: int) -> np.ndarray:
    width, blob = _list(v, what, n=2)
    if type(width) is not int or width not in _DTYPES or not isinstance(blob, bytes) or len(blob) % width:
        raise MessageError(f"{what}: bad packed integers")
    if len(blob) // width > limit:
        raise MessageError(f"{what}: too many entries")
    return np.frombuffer(blob, dtype=_DTYPES[width]).astype(np.int64)


def _floats(v: Any, what: str, n: int) -> np.ndarray:
    width, blob = _list(v, what, n=2)
    if width not in (4, 8) or not isinstance(blob, bytes) or len(blob) != n * width:
        raise MessageError(f"{what}: expected {n} packed floats")
    return np.frombuffer(blob, dtype=np.float32 if width == 4 else np.float64).astype(np.float64)


def _counts(v: Any, total: int, max_decompressed: int) -> np.ndarray:
    width, codec, blob = _list(v, "counts", n=3)
    if type(width) is not int or width not in _DTYPES or codec not in (0, 1) or not isinstance(blob, bytes):
        raise MessageError("counts: bad packed counts")
    expected = total * width
    if codec == 1:
        blob = _inflate(blob, min(expected, max_decompressed))
    if len(blob) != expected:
        raise MessageError(f"counts: expected {total} counts of {width} bytes")
    planes = np.frombuffer(blob, dtype=np.uint8).reshape(width, total)
    return np.ascontiguousarray(planes.T).view(_DTYPES[width]).ravel().astype(np.int64)


def _sketches(b: list[Any], max_decompressed: int) -> tuple[list[FeatureSketch], np.ndarray]:
    kinds = b[15]
    if not isinstance(kinds, bytes) or len(kinds) > MAX_FEATURES + MAX_OUTPUTS or kinds.strip(b"\x00\x01"):
        raise MessageError("report: bad sketch kinds")
    k = len(kinds)
    lengths = _unpack(b[16], "lengths", k)
    nans = _unpack(b[18], "nan counts", k)
    if (lengths > MAX_BINS).any():
        raise MessageError("report: too many bins in one sketch")
    if lengths.size != k or nans.size != k:
        raise MessageError("report: sketch sizes do not add up")
    counts = _counts(b[17], int(lengths.sum()) + LATENCY_BUCKETS, max_decompressed)
    n_num = kinds.count(0)
    minmax = _floats(b[19], "min/max", 2 * n_num)
    moments = _floats(b[20], "moments", 2 * n_num)  # may be non-finite for absurd inputs
    extras = _list(b[21], "categorical", n=k - n_num)
    ends_arr = np.cumsum(lengths)
    running = np.concatenate([[0], np.cumsum(counts)])
    totals = (running[ends_arr] - running[ends_arr - lengths]).tolist()  # per-sketch n
    ends, nan_list, mm, mo = ends_arr.tolist(), nans.tolist(), minmax.tolist(), moments.tolist()
    out: list[FeatureSketch] = []
    num_i = cat_i = 0
    for i, (kind, end, size) in enumerate(zip(kinds, ends, lengths.tolist(), strict=True)):
        part = counts[end - size : end]
        if kind == 0:
            j = 2 * num_i
            n, mean = totals[i], mo[j]
            sketch = NumericSketch(part, nan_list[i], mm[j], mm[j + 1], mean * n, mo[j + 1] + mean * mean * n)
            out.append(sketch)
            num_i += 1
        else:
            x = _list(extras[cat_i], "categorical", n=3)
            keys = _list(x[0], "unseen", limit=MAX_FREQUENT_ITEMS)
            vals = _list(x[1], "unseen", n=len(keys))
            unseen = {
                _text(key, "unseen", MAX_LABEL_CHARS): _int(c, "unseen")
                for key, c in zip(keys, vals, strict=True)
            }
            out.append(CategoricalSketch(part, nan_list[i], unseen, _int(x[2], "unseen_error")))
            cat_i += 1
    return out, counts[counts.size - LATENCY_BUCKETS :]


def _inflate(data: bytes, max_decompressed: int) -> bytes:
    """Decompress one zstd frame whose header declares a size within the bound. zstd itself
    refuses output beyond the declared size, so a lying header cannot inflate further."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared < 0:
            raise MessageError("report: zstd frame without a declared content size")
        if declared > max_decompressed:
            raise MessageError(f"report: decompresses to more than {max_decompressed} bytes")
        unpacker = getattr(_local, "unpacker", None)
        if unpacker is None:
            unpacker = _local.unpacker = zstandard.ZstdDecompressor()
        dobj = unpacker.decompressobj()
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
    if not isinstance(body, list) or len(body) not in (BODY_FIELDS, BODY_FIELDS + 1):
        raise MessageError(f"report: expected a list of {BODY_FIELDS} or {BODY_FIELDS + 1} fields")
    b = body
    if b[0] != TELEMETRY_SCHEMA_VERSION:
        raise MessageError(f"report: unsupported schema_version {b[0]!r}")
    sketches, latency_counts = _sketches(b, max_decompressed)
    n_features = _int(b[14], "feature count", len(sketches))
    if len(sketches) - n_features > MAX_OUTPUTS or n_features > MAX_FEATURES:
        raise MessageError("report: too many features or outputs")
    lat = _list(b[22], "latency", n=2)
    res = _list(b[23], "resources", n=3)
    report = TelemetryReport(
        device_id=_text(b[1], "device_id"), seq=_int(b[2], "seq"), model=_text(b[3], "model"),
        version=_text(b[4], "version"), cohort=_text(b[5], "cohort"), profile_id=_text(b[6], "profile_id"),
        interval_start=_float(b[7], "interval_start", finite=True),
        interval_end=_float(b[8], "interval_end", finite=True),
        requests=_int(b[9], "requests"), errors=_int(b[10], "errors"), rejected=_int(b[11], "rejected"),
        dropped_reports=_int(b[12], "dropped_reports"), merged_reports=_int(b[13], "merged_reports"),
        features=sketches[:n_features], outputs=sketches[n_features:],
        latency_counts=latency_counts,
        latency_sum_s=_float(lat[0], "latency.sum", finite=True),
        latency_max_s=_float(lat[1], "latency.max", finite=True),
        resources=Resources(
            _int(res[0], "resources.rss"), _float(res[1], "resources.cpu_user", finite=True),
            _float(res[2], "resources.cpu_system", finite=True),
        ),
        performance=decode_performance(b[BODY_FIELDS]) if len(b) > BODY_FIELDS else None,
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
