"""The v1 wire protocol: topics, message models and chunk framing refuse anything malformed."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.contract.protocol import (
    MAX_CHUNK_SIZE,
    MAX_CONTROL_MESSAGE,
    ChunkHeader,
    Event,
    ObjectRequest,
    ReportedState,
    TopicKind,
    Topics,
    decode_chunk,
    decode_event,
    decode_reported,
    decode_request,
    encode_chunk,
    encode_event,
    encode_reported,
    encode_request,
    parse_topic,
    validate_object_path,
)
from agent.errors import MessageError, MisuseError

P = "edgefleet"


def _req(**kw: object) -> ObjectRequest:
    base: dict[str, object] = {
        "request_id": "0123456789abcdef",
        "path": "targets/m/ab.bin",
        "offset": 0,
        "length": 4096,
    }
    base.update(kw)
    return ObjectRequest.model_validate(base)


@pytest.mark.unit
def test_topics_round_trip_through_parse() -> None:
    t = Topics(P, "dev-1")
    assert t.desired() == "edgefleet/v1/devices/dev-1/desired"
    cases = {
        t.desired(): (TopicKind.DEVICE_DESIRED, "dev-1"),
        t.responses(): (TopicKind.RESPONSES, "dev-1"),
        t.reported(): (TopicKind.REPORTED, "dev-1"),
        t.events(): (TopicKind.EVENTS, "dev-1"),
        t.telemetry(): (TopicKind.TELEMETRY, "dev-1"),
        t.requests(): (TopicKind.REQUEST, "dev-1"),
    }
    for topic, (kind, dev) in cases.items():
        parsed = parse_topic(P, topic)
        assert (parsed.kind, parsed.device_id) == (kind, dev)
    assert parse_topic(P, t.cohort_desired("eu-1")).cohort == "eu-1"
    assert parse_topic(P, t.metadata("2.root.json")).name == "2.root.json"
    assert Topics("acme/prod").all_requests("fleet") == "$share/fleet/acme/prod/v1/repo/requests/+"


@pytest.mark.unit
@pytest.mark.parametrize(
    "topic",
    [
        "edgefleet/v2/devices/d/desired",
        "other/v1/devices/d/desired",
        "edgefleet/v1/devices/+/desired",
        "edgefleet/v1/devices/#",
        "edgefleet/v1/devices//desired",
        "edgefleet/v1/devices/d/desired/extra",
        "edgefleet/v1/devices/d/secrets",
        "edgefleet/v1/repo/metadata/../x.json",
        "edgefleet/v1/repo/requests/$SYS",
        "edgefleet/v1/cohorts/c/reported",
    ],
)
def test_parse_topic_rejects_malformed(topic: str) -> None:
    with pytest.raises(MessageError):
        parse_topic(P, topic)


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "$x", "-lead", "x" * 65, "dev 1"])
def test_topics_refuse_unsafe_ids(bad: str) -> None:
    with pytest.raises(MisuseError):
        Topics(P, bad)
    with pytest.raises(MisuseError):
        Topics(P).desired(bad)


@pytest.mark.unit
@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "targets/../../x",
        "/abs",
        "metadata/../keys",
        "targets/.hidden",
        "other/x",
        "targets//x",
        "metadata/a/b.json",
        "targets/a\\b",
    ],
)
def test_object_paths_cannot_escape(path: str) -> None:
    with pytest.raises(MessageError):
        validate_object_path(path)
    with pytest.raises(MessageError):
        decode_request(json.dumps({**json.loads(encode_request(_req())), "path": path}).encode())


@pytest.mark.unit
def test_request_round_trip_and_refusals() -> None:
    req = _req(offset=65536, length=65536)
    assert decode_request(encode_request(req)) == req
    good = json.loads(encode_request(req))
    for bad in (
        {**good, "schema_version": 2},
        {**good, "length": MAX_CHUNK_SIZE + 1},
        {**good, "offset": -1},
        {**good, "request_id": "XYZ"},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "schema_version"},
    ):
        with pytest.raises(MessageError):
            decode_request(json.dumps(bad).encode())
    with pytest.raises(MessageError, match="over"):
        decode_request(b" " * (MAX_CONTROL_MESSAGE + 1))
    for junk in (b"", b"not json", b"[1,2]", b"\xff\xfe"):
        with pytest.raises(MessageError):
            decode_request(junk)


@pytest.mark.unit
def test_chunk_frame_round_trip() -> None:
    payload = bytes(range(256)) * 16
    header = ChunkHeader(
        request_id="0123456789abcdef",
        path="targets/m/ab.bin",
        offset=4096,
        total_length=8192,
        status=200,
        final=True,
        etag="e1",
    )
    got_header, got_payload = decode_chunk(encode_chunk(header, payload))
    assert got_header == header and got_payload == payload
    miss = ChunkHeader(request_id="0123456789abcdef", path="metadata/2.root.json", offset=0, status=404)
    assert decode_chunk(encode_chunk(miss))[0].status == 404


@pytest.mark.unit
def test_chunk_frame_refusals() -> None:
    header = ChunkHeader(
        request_id="0123456789abcdef",
        path="targets/m/ab.bin",
        offset=0,
        total_length=100,
        status=200,
        final=False,
    )
    frame = encode_chunk(header, b"x" * 50)
    assert decode_chunk(frame)[1] == b"x" * 50
    with pytest.raises(MessageError, match="magic"):
        decode_chunk(b"XXXX" + frame[4:])
    with pytest.raises(MessageError, match="shorter"):
        decode_chunk(b"EF")
    with pytest.raises(MessageError, match="header length"):
        decode_chunk(struct.pack(">4sH", b"EFC1", 900) + b"{}")
    with pytest.raises(MessageError, match="past the object"):
        decode_chunk(encode_chunk(header.model_copy(update={"offset": 80}), b"x" * 50))
    with pytest.raises(MessageError, match="final"):
        decode_chunk(encode_chunk(header.model_copy(update={"final": True}), b"x" * 50))
    with pytest.raises(MessageError, match="over"):
        decode_chunk(frame, max_payload=16)
    with pytest.raises(MisuseError):
        encode_chunk(header.model_copy(update={"status": 404}), b"x")
    with pytest.raises(MisuseError):
        encode_chunk(header, b"x" * (MAX_CHUNK_SIZE + 1))
    head = json.loads(frame[6 : 6 + struct.unpack(">H", frame[4:6])[0]])
    for bad in ({**head, "schema_version": 9}, {**head, "status": 302}, {**head, "offset": -5}):
        raw = json.dumps(bad).encode()
        with pytest.raises(MessageError):
            decode_chunk(struct.pack(">4sH", b"EFC1", len(raw)) + raw)


@pytest.mark.unit
@given(st.binary(max_size=300))
def test_decode_chunk_never_crashes_on_junk(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode_chunk(data)


@pytest.mark.unit
def test_reported_state_takes_device_from_topic() -> None:
    state = ReportedState(
        agent_version="0.1.0",
        state="committed",
        active_bundle="m@1.0.0",
        runtimes=["onnx"],
        architecture="x86_64",
        labels={"site": "a"},
        timestamp=1.7e9,
    )
    got = decode_reported(encode_reported(state), "dev-1")
    assert got.device_id == "dev-1" and got.active_bundle == "m@1.0.0" and got.online
    claimed = state.model_copy(update={"device_id": "dev-2"})
    with pytest.raises(MessageError, match="dev-2"):
        decode_reported(encode_reported(claimed), "dev-1")
    with pytest.raises(MessageError):
        decode_reported(json.dumps({"schema_version": 1, "timestamp": -1}).encode(), "dev-1")


@pytest.mark.unit
def test_event_round_trip_and_refusals() -> None:
    ev = Event(
        type="rolled_back",
        bundle_id="m@2",
        previous_bundle_id="m@1",
        reason="golden vectors",
        measurements={"max_abs_err": 0.5},
        timestamp=1.7e9,
        seq=7,
    )
    assert decode_event(encode_event(ev), "d").seq == 7
    assert decode_event(encode_event(ev), "d").device_id == "d"  # the topic's id is filled in
    with pytest.raises(MessageError, match="names device 'e' but arrived for 'd'"):
        decode_event(encode_event(ev.model_copy(update={"device_id": "e"})), "d")
    raw = json.loads(encode_event(ev))
    for bad in ({**raw, "type": "Bad Type"}, {**raw, "seq": -1}, {**raw, "schema_version": "1"}):
        with pytest.raises(MessageError):
            decode_event(json.dumps(bad).encode(), "d")
    with pytest.raises(MisuseError):
        # valid field by field (64 measurements of 250-character names), over 16 KiB in all
        encode_event(ev.model_copy(update={"measurements": {f"{i:02d}" + "k" * 248: 1.0 for i in range(64)}}))
    with pytest.raises(ValueError, match="length <= 64"):  # a copy is validated like a construction
        ev.model_copy(update={"measurements": {f"k{i}": 1.0 for i in range(65)}})
