"""The MQTT wire protocol shared by agent and fleet: topic tree, message models, framing.

The topic tree itself is `agent.contract.topics` (imported here, so a caller needs one import).

Everything here is pure (bytes and strings in, models out) so both sides and the tests use
the same rules. The topic tree is versioned (`<prefix>/v1/...`) so a v2 can run beside it.
The device id that counts is always the one in the topic (which broker ACLs bind to the
authenticated user); a payload that names another device is refused.

Errors: every `decode_*`/`parse_topic` raises `agent.errors.MessageError` for malformed,
oversized, wrong-version or misaddressed input; `Topics`/`encode_*` raise
`agent.errors.MisuseError` for invalid arguments.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Annotated, Any, Literal

from agent.contract.strict import (
    Meta,
    StrictStruct,
    ValidationError,
    clean_schema_descriptions,
    describe,
    field,
)
from agent.contract.topics import ID_RE as ID_RE
from agent.contract.topics import METADATA_NAME_RE as METADATA_NAME_RE
from agent.contract.topics import PROTOCOL_VERSION as PROTOCOL_VERSION
from agent.contract.topics import ParsedTopic as ParsedTopic
from agent.contract.topics import TopicKind as TopicKind
from agent.contract.topics import Topics as Topics
from agent.contract.topics import parse_topic as parse_topic
from agent.contract.topics import validate_id as validate_id
from agent.contract.topics import validate_prefix as validate_prefix
from agent.errors import MessageError, MisuseError

SCHEMA_VERSION = 1

MIN_CHUNK_SIZE = 4 * 1024
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 128 * 1024
MAX_CONTROL_MESSAGE = 16 * 1024  # requests, reported state, events
MAX_HEADER_BYTES = 1024  # JSON header of a chunk frame
MAX_CHUNK_FRAME = MAX_CHUNK_SIZE + MAX_HEADER_BYTES + 6
CHUNK_MAGIC = b"EFC1"
_FRAME_PREFIX = struct.Struct(">4sH")

OBJECT_PATH_RE = re.compile(
    r"^(?:metadata/[A-Za-z0-9._-]{1,128}|targets/(?:[A-Za-z0-9._-]{1,128}/){0,4}[A-Za-z0-9._-]{1,200})$"
)
REQUEST_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")


def validate_object_path(path: str) -> str:
    """Return a repository object path (`metadata/<file>` or `targets/<dir>/<file>`) or raise MessageError.

    Refuses `..`, absolute paths, empty segments and anything outside the two roots, so a
    publisher can join it under its repository directory without escaping it.
    """
    if not isinstance(path, str) or not OBJECT_PATH_RE.fullmatch(path):
        raise MessageError(f"invalid object path {path!r}")
    if any(seg in ("", ".", "..") or seg.startswith(".") for seg in path.split("/")):
        raise MessageError(f"object path {path!r} has an unsafe segment")
    return path


# --- message models ----------------------------------------------------------------------
def _whole(rx: re.Pattern[str] | str) -> str:
    """A `Meta(pattern=...)` for the whole string (msgspec searches; `$` allows a trailing newline)."""
    pattern = rx if isinstance(rx, str) else rx.pattern
    return pattern.removesuffix("$") + r"\Z"


class _Msg(StrictStruct, frozen=True, kw_only=True):
    schema_version: Literal[1] = 1


Timestamp = Annotated[float, Meta(ge=0, le=1e11)]
ShortText = Annotated[str, Meta(max_length=256)]
RequestId = Annotated[str, Meta(pattern=_whole(REQUEST_ID_RE))]
DeviceId = Annotated[str, Meta(pattern=_whole(ID_RE))]
ByteOffset = Annotated[int, Meta(ge=0, le=2**40)]


class ObjectRequest(_Msg, frozen=True, kw_only=True):
    """Device -> publisher: send `length` bytes of `path` from `offset` (one chunk)."""

    request_id: RequestId
    path: str
    offset: ByteOffset
    length: Annotated[int, Meta(ge=1, le=MAX_CHUNK_SIZE)]

    def _check(self) -> None:
        try:
            validate_object_path(self.path)
        except MessageError as exc:
            raise ValueError(str(exc)) from None


class ChunkHeader(_Msg, frozen=True, kw_only=True):
    """Publisher -> device: the header of one chunk frame (payload follows it raw).

    `status` borrows HTTP codes: 200 data, 400 bad request, 404 no such object, 413 over
    the publisher's limit, 416 offset past the end, 429 too many requests in flight, 503 busy.
    `etag` changes when the object at `path` changes, so a resumed download never mixes versions.
    """

    request_id: RequestId
    path: Annotated[str, Meta(max_length=512)]
    offset: ByteOffset
    total_length: ByteOffset = 0
    status: Literal[200, 400, 404, 413, 416, 429, 500, 503]
    final: bool = False
    etag: Annotated[str, Meta(max_length=128)] = ""
    reason: ShortText = ""


class ReportedState(_Msg, frozen=True, kw_only=True):
    """Device -> fleet (retained): what the device runs now; the Last Will sets `online=False`."""

    device_id: DeviceId | None = None
    agent_version: ShortText = ""
    state: Annotated[str, Meta(max_length=64)] = "idle"
    active_bundle: ShortText | None = None
    previous_bundle: ShortText | None = None
    director_sequence: Annotated[int, Meta(ge=0)] | None = None
    runtimes: Annotated[list[ShortText], Meta(max_length=16)] = field(default_factory=list)
    architecture: ShortText = ""
    memory_mb: Annotated[float, Meta(ge=0)] | None = None
    labels: Annotated[dict[ShortText, ShortText], Meta(max_length=64)] = field(default_factory=dict)
    online: bool = True
    timestamp: Timestamp
    #: What this agent understands beyond protocol v1's core, e.g. `delta` (director documents
    #: may name a delta target): the fleet adds optional fields only for agents that list them.
    features: Annotated[list[ShortText], Meta(max_length=16)] = field(default_factory=list)
    #: How the active bundle arrived when not over the broker: `offline_install` (imported file).
    install_origin: Annotated[str, Meta(max_length=32)] = ""

    # Why the update waits on the device: `waiting_for_window` or `held: <why>` (absent: it does
    # not). Sent only while holding, so a fleet older than this field refuses only those reports.
    hold: Annotated[str, Meta(max_length=256)] | None = None


class Event(_Msg, frozen=True, kw_only=True):
    """Device -> fleet: something happened (installed, rolled_back, health_failed, ...)."""

    device_id: DeviceId | None = None
    type: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_.]{0,63}\Z")]
    bundle_id: ShortText | None = None
    previous_bundle_id: ShortText | None = None
    reason: Annotated[str, Meta(max_length=2048)] = ""
    measurements: Annotated[dict[ShortText, float], Meta(max_length=64)] = field(default_factory=dict)
    timestamp: Timestamp
    seq: Annotated[int, Meta(ge=0)]


# --- encoding ----------------------------------------------------------------------------
def _dump(model: StrictStruct, limit: int) -> bytes:
    data = model.model_dump_json(exclude_none=True).encode()
    if len(data) > limit:
        raise MisuseError(f"{type(model).__name__} encodes to {len(data)} bytes, over the {limit} limit")
    return data


def _load(cls: type[Any], data: bytes, limit: int, device_id: str | None = None) -> Any:
    """Validate one message; with `device_id` (its topic's), the payload is bound to that device."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError(f"{cls.__name__}: payload must be bytes")
    if len(data) > limit:
        raise MessageError(f"{cls.__name__}: {len(data)} bytes is over the {limit} byte limit")
    try:
        raw = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"{cls.__name__}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MessageError(f"{cls.__name__}: expected a JSON object")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise MessageError(f"{cls.__name__}: unsupported schema_version {raw.get('schema_version')!r}")
    if device_id is not None:  # the topic's device id counts; a payload naming another is refused
        named = raw.get("device_id")
        if named is not None and named != device_id:
            raise MessageError(f"payload names device {named!r} but arrived for {device_id!r}")
        raw["device_id"] = device_id
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise MessageError(f"{cls.__name__}: {describe(exc)}") from None


def encode_request(req: ObjectRequest) -> bytes:
    """JSON bytes of an object request (raises MisuseError if over MAX_CONTROL_MESSAGE)."""
    return _dump(req, MAX_CONTROL_MESSAGE)


def decode_request(data: bytes) -> ObjectRequest:
    """Parse an object request; raise MessageError if malformed, oversized or unsafe."""
    req: ObjectRequest = _load(ObjectRequest, data, MAX_CONTROL_MESSAGE)
    return req


def encode_chunk(header: ChunkHeader, payload: bytes = b"") -> bytes:
    """Frame = `EFC1` + u16 header length + JSON header + raw payload (raises MisuseError)."""
    head = header.model_dump_json().encode()
    if len(head) > MAX_HEADER_BYTES:
        raise MisuseError(f"chunk header is {len(head)} bytes, over {MAX_HEADER_BYTES}")
    if len(payload) > MAX_CHUNK_SIZE:
        raise MisuseError(f"chunk payload is {len(payload)} bytes, over {MAX_CHUNK_SIZE}")
    if header.status != 200 and payload:
        raise MisuseError("only a 200 chunk carries a payload")
    return _FRAME_PREFIX.pack(CHUNK_MAGIC, len(head)) + head + payload


def decode_chunk(data: bytes, max_payload: int = MAX_CHUNK_SIZE) -> tuple[ChunkHeader, bytes]:
    """Split a chunk frame into header and payload; raise MessageError if malformed or oversized.

    Also checks the payload against the header: it must lie inside `total_length`, and
    `final` must be set exactly when it reaches the end.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError("chunk frame must be bytes")
    view = memoryview(data)
    if len(view) < _FRAME_PREFIX.size:
        raise MessageError("chunk frame is shorter than its prefix")
    if len(view) > max_payload + MAX_HEADER_BYTES + _FRAME_PREFIX.size:
        raise MessageError(f"chunk frame of {len(view)} bytes is over the limit for {max_payload} B chunks")
    magic, head_len = _FRAME_PREFIX.unpack_from(view)
    if magic != CHUNK_MAGIC:
        raise MessageError(f"chunk frame has magic {bytes(magic)!r}, expected {CHUNK_MAGIC!r}")
    end = _FRAME_PREFIX.size + head_len
    if head_len > MAX_HEADER_BYTES or end > len(view):
        raise MessageError("chunk frame header length is out of range")
    header: ChunkHeader = _load(ChunkHeader, bytes(view[_FRAME_PREFIX.size : end]), MAX_HEADER_BYTES)
    payload = bytes(view[end:])
    if len(payload) > max_payload:
        raise MessageError(f"chunk payload of {len(payload)} bytes is over {max_payload}")
    if header.status != 200:
        if payload:
            raise MessageError(f"a {header.status} chunk carries a payload")
        return header, payload
    if header.offset + len(payload) > header.total_length:
        raise MessageError("chunk extends past the object's total length")
    if header.final != (header.offset + len(payload) == header.total_length):
        raise MessageError("chunk 'final' flag disagrees with offset, length and total")
    if not payload and header.total_length != 0:
        raise MessageError("empty 200 chunk for a non-empty object")
    return header, payload


def encode_reported(state: ReportedState) -> bytes:
    """JSON bytes of a reported state (raises MisuseError if over MAX_CONTROL_MESSAGE)."""
    return _dump(state, MAX_CONTROL_MESSAGE)


def decode_reported(data: bytes, device_id: str) -> ReportedState:
    """Parse a reported state that arrived on `device_id`'s topic; raise MessageError on mismatch."""
    state: ReportedState = _load(ReportedState, data, MAX_CONTROL_MESSAGE, device_id)
    return state


def encode_event(event: Event) -> bytes:
    """JSON bytes of an event (raises MisuseError if over MAX_CONTROL_MESSAGE)."""
    return _dump(event, MAX_CONTROL_MESSAGE)


def decode_event(data: bytes, device_id: str) -> Event:
    """Parse an event that arrived on `device_id`'s topic; raise MessageError on mismatch."""
    event: Event = _load(Event, data, MAX_CONTROL_MESSAGE, device_id)
    return event


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every JSON message (written to docs/protocol.schema.json).

    The rules `_check` adds (object paths, addressees) are in the docstrings, not the schema.
    """
    import msgspec.json

    types = (ObjectRequest, ChunkHeader, ReportedState, Event)
    _, components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://edgefleet.dev/schemas/protocol-{PROTOCOL_VERSION}.json",
        "oneOf": [{"$ref": f"#/$defs/{t.__name__}"} for t in types],
        "$defs": _ecma_patterns(clean_schema_descriptions(components)),
    }


def _ecma_patterns(node: Any) -> Any:
    """Python's end-of-string `\\Z` (see `_whole`) as JSON Schema's `$`, which means the same there."""
    if isinstance(node, dict):
        return {
            k: v.removesuffix("\\Z") + "$" if k == "pattern" and isinstance(v, str) and v.endswith("\\Z")
            else _ecma_patterns(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_ecma_patterns(v) for v in node]
    return node


if __name__ == "__main__":  # pragma: no cover - regenerates the docs file
    import sys

    json.dump(json_schemas(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
