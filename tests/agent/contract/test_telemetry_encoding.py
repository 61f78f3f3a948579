"""The report's wire encoding: round trip, size, and every kind of bad payload."""

from __future__ import annotations

import contextlib

import cbor2
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract.telemetry import LATENCY_BUCKETS, CategoricalSketch, NumericSketch, TelemetryReport
from agent.contract.telemetry_codec import FLAG_ZSTD, check_report_shape, decode_report, encode_report
from agent.errors import MessageError


def _report(n_counts: int = 102, scale: int = 10, seed: int = 0) -> TelemetryReport:
    rng = np.random.default_rng(seed)
    feats: list[NumericSketch | CategoricalSketch] = [
        NumericSketch(rng.poisson(scale, n_counts), 1, -3.5, 2.25, 12.5, 400.0) for _ in range(20)
    ]
    feats.append(CategoricalSketch(np.array([5, 0, 70000, 2]), 0, {"zz": 2}, 0))
    return TelemetryReport(
        device_id="dev-1", seq=42, model="mlp", version="1.2.0", interval_start=10.0, interval_end=70.0,
        features=feats, outputs=[NumericSketch(rng.poisson(scale, n_counts))], requests=1000, errors=2,
        cohort="canary", profile_id="abc", dropped_reports=3,
    )


def _same(a: TelemetryReport, b: TelemetryReport) -> None:
    assert (a.device_id, a.seq, a.model, a.version, a.cohort, a.requests, a.errors, a.dropped_reports) == (
        b.device_id, b.seq, b.model, b.version, b.cohort, b.requests, b.errors, b.dropped_reports)
    for x, y in zip(a.features + a.outputs, b.features + b.outputs, strict=True):
        assert type(x) is type(y) and np.array_equal(x.counts, y.counts) and x.nan_count == y.nan_count
        if isinstance(x, NumericSketch) and isinstance(y, NumericSketch):
            assert (x.min, x.max) == (y.min, y.max)  # float32 when exact, else float64
            assert (y.sum, y.sum_sq) == pytest.approx((x.sum, x.sum_sq), rel=1e-6, abs=1e-6)
        elif isinstance(x, CategoricalSketch) and isinstance(y, CategoricalSketch):
            assert x.unseen == y.unseen


@pytest.mark.unit
def test_round_trip_and_compression_flag() -> None:
    rep = _report()
    data = encode_report(rep)
    assert data[0] == FLAG_ZSTD and len(data) < 3000
    _same(rep, decode_report(data))
    empty = TelemetryReport("d", 0, "m", "1.0.0", 0.0, 0.0, [], [])
    tiny = encode_report(empty)
    assert tiny[0] == FLAG_ZSTD or len(tiny) < 200
    _same(empty, decode_report(tiny))


@pytest.mark.unit
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**40), st.integers(1, 300), st.floats(-1e100, 1e100))
def test_round_trip_any_count_width(top: int, bins: int, value: float) -> None:
    counts = np.zeros(bins, dtype=np.int64)
    counts[-1] = top
    sketch = NumericSketch(counts, 0, value, value, value * top, value * value * top)
    rep = TelemetryReport("d", 1, "m", "1.0.0", 0.0, 1.0, [sketch], [])
    _same(rep, decode_report(encode_report(rep)))


@pytest.mark.unit
def test_truncated_and_corrupted_payloads_are_refused() -> None:
    data = encode_report(_report())
    for cut in (1, 2, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(MessageError):
            decode_report(data[:cut])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with pytest.raises(MessageError):
        decode_report(bytes(flipped))
    with pytest.raises(MessageError, match="flags"):
        decode_report(b"\x80" + data[1:])
    raw = b"\x00" + cbor2.dumps([1, "d"])
    with pytest.raises(MessageError, match="list of 24"):
        decode_report(raw)
    with pytest.raises(MessageError, match="trailing"):
        decode_report(b"\x00" + zstandard.ZstdDecompressor().decompress(data[1:]) + b"\x00")


@pytest.mark.unit
def test_oversized_and_decompression_bombs_are_refused() -> None:
    data = encode_report(_report())
    with pytest.raises(MessageError, match="size"):
        decode_report(data, max_bytes=len(data) - 1)
    bomb = bytes([FLAG_ZSTD]) + zstandard.ZstdCompressor(level=19).compress(b"\x00" * (64 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    with pytest.raises(MessageError, match="decompresses"):
        decode_report(bomb)
    # no content size in the frame header: refused before decompressing anything
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * (8 * 1024 * 1024))
    with pytest.raises(MessageError, match="declared content size"):
        decode_report(bytes([FLAG_ZSTD]) + streamed)
    # a header that under-declares the size: zstd stops at the declared size
    honest = zstandard.ZstdCompressor(write_content_size=True).compress(b"\x00" * 4096)
    liar = bytearray(honest)
    params = zstandard.get_frame_parameters(honest)
    assert params.content_size == 4096
    small = zstandard.ZstdCompressor(write_content_size=True).compress(b"\x00" * 16)
    header = zstandard.frame_header_size(small)
    liar[: zstandard.frame_header_size(honest)] = small[:header]
    with pytest.raises(MessageError):
        decode_report(bytes([FLAG_ZSTD]) + bytes(liar))
    with pytest.raises(MessageError, match="trailing"):
        decode_report(data + b"\x00")


def _sketch_fields(**changes: object) -> dict[int, object]:
    """Body fields 14..21 for one numeric sketch of 3 bins (+ the latency histogram)."""
    lat = LATENCY_BUCKETS
    counts = bytes([1, 2, 3]) + bytes(lat)
    fields: dict[str, object] = {
        "n_features": 1, "kinds": b"\x00", "lengths": [1, b"\x03"], "counts": [1, 0, counts],
        "nan": [1, b"\x00"], "minmax": [8, bytes(16)], "moments": [4, bytes(8)], "cat": [],
    }
    fields.update(changes)
    return dict(zip(range(14, 22), fields.values(), strict=True))


@pytest.mark.unit
def test_wrong_types_and_values_are_refused() -> None:
    body = cbor2.loads(zstandard.ZstdDecompressor().decompress(encode_report(_report())[1:]))

    def refused(changes: dict[int, object], message: str = "") -> None:
        broken = list(body)
        for index, value in changes.items():
            broken[index] = value
        with pytest.raises(MessageError, match=message):
            decode_report(b"\x00" + cbor2.dumps(broken))

    refused({0: 2}, "schema_version")
    refused({1: 7}, "device_id")
    refused({2: -1}, "seq")
    refused({9: 1.5}, "requests")
    refused({7: 10.0, 8: 5.0}, "interval")
    refused({22: [0.0]}, "latency")
    template = list(body)
    template[14:22] = _sketch_fields().values()
    assert decode_report(b"\x00" + cbor2.dumps(template)).features[0].counts.tolist() == [1, 2, 3]
    refused(_sketch_fields(lengths=[2, b"\x00\x50"]), "too many bins")
    refused(_sketch_fields(lengths=[1, b"\x04"]), "expected 4 counts|counts")
    refused(_sketch_fields(nan=[1, b"\x00\x00"]), "nan counts")
    refused(_sketch_fields(kinds=b"\x00\x00", lengths=[1, b"\x03"]), "add up")
    refused(_sketch_fields(kinds=b"\x07"), "kinds")
    refused(_sketch_fields(counts=[3, 0, b"\x00" * 9]), "packed counts")
    refused(_sketch_fields(counts=[1, 1, b"\x28\xb5\x2f\xfd" + bytes(10)]), "zstd")
    refused(_sketch_fields(minmax=[8, bytes(8)]), "packed floats")
    refused(_sketch_fields(moments=[4, bytes(4)]), "packed floats")
    refused(_sketch_fields(n_features=2), "feature count")
    many = [[f"k{i}" for i in range(100)], list(range(100)), 0]
    refused(_sketch_fields(kinds=b"\x01", minmax=[8, b""], moments=[4, b""], cat=[many]), "unseen")
    refused(_sketch_fields(kinds=b"\x01", minmax=[8, b""], moments=[4, b""], cat=[]), "categorical")


@pytest.mark.unit
def test_shape_check_against_profile() -> None:
    rep = _report()
    check_report_shape(rep, [102] * 20 + [4], [102])
    with pytest.raises(MessageError, match="profile"):
        check_report_shape(rep, [101] * 20 + [4], [102])


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_payloads_raise_only_message_error(data: st.DataObject) -> None:
    payload = bytearray(encode_report(_report(n_counts=12, seed=1)))
    raw_body = b"\x00" + zstandard.ZstdDecompressor().decompress(bytes(payload[1:]))
    base = bytearray(data.draw(st.sampled_from([bytes(payload), raw_body])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        base = base[: data.draw(st.integers(0, len(base)))]
    with contextlib.suppress(MessageError):  # the only error a bad payload may raise
        decode_report(bytes(base))


@pytest.mark.unit
@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_message_error(blob: bytes) -> None:
    for candidate in (blob, b"\x00" + blob, b"\x01" + blob):
        with contextlib.suppress(MessageError):
            decode_report(candidate)


@pytest.mark.unit
@pytest.mark.parametrize("field", [16, 17])  # the packed sketch sizes, then the packed counts
def test_an_unhashable_width_is_a_message_error_not_a_type_error(field: int) -> None:
    """Found by the fuzz test: a list where a packed width belongs used to raise TypeError."""
    import cbor2

    payload = encode_report(_report(n_counts=12, seed=1))
    raw = zstandard.ZstdDecompressor().decompress(payload[1:]) if payload[0] else payload[1:]
    body = cbor2.loads(raw)
    body[field][0] = [8]
    with pytest.raises(MessageError):
        decode_report(b"\x00" + cbor2.dumps(body, canonical=True))
