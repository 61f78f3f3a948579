"""The MQTT wire protocol shared by agent and fleet: topic tree, message models, framing.

Everything here is pure (bytes and strings in, models out) so both sides and the tests use
the same rules. The topic tree is versioned (`<prefix>/v1/...`) so a v2 can run beside it.
The device id that counts is always the one in the topic (which broker ACLs bind to the
authenticated user); a payload that names another device is refused.

Errors: every `decode_*`/`parse_topic` raises `agent.errors.MessageError` for malformed,
oversized, wrong-version or misaddressed input; `Topics`/`encode_*` raise
`agent.errors.MisuseError` for invalid arguments.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from agent.contract.strict import (
    Meta,
    StrictStruct,
    ValidationError,
    clean_schema_descriptions,
    describe,
    field,
)
from agent.errors import MessageError, MisuseError

PROTOCOL_VERSION = "v1"
SCHEMA_VERSION = 1

MIN_CHUNK_SIZE = 4 * 1024
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 128 * 1024
MAX_CONTROL_MESSAGE = 16 * 1024  # requests, reported state, events
MAX_HEADER_BYTES = 1024  # JSON header of a chunk frame
MAX_CHUNK_FRAME = MAX_CHUNK_SIZE + MAX_HEADER_BYTES + 6
CHUNK_MAGIC = b"EFC1"
_FRAME_PREFIX = struct.Struct(">4sH")

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PREFIX_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
METADATA_NAME_RE = re.compile(r"^(?:[1-9][0-9]{0,9}\.)?[a-z][a-z0-9_-]{0,63}\.json$")
OBJECT_PATH_RE = re.compile(
    r"^(?:metadata/[A-Za-z0-9._-]{1,128}|targets/(?:[A-Za-z0-9._-]{1,128}/){0,4}[A-Za-z0-9._-]{1,200})$"
)
REQUEST_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")


def validate_id(value: str, what: str = "device id") -> str:
    """Return `value` if it is a safe topic segment (no `/ + # $`, 1-64 chars), else raise MisuseError."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise MisuseError(f"invalid {what} {value!r}: use 1-64 of [A-Za-z0-9._-], starting alphanumeric")
    return value


def validate_prefix(prefix: str) -> str:
    """Return `prefix` (1-4 safe segments joined by `/`), else raise MisuseError."""
    segs = prefix.split("/") if isinstance(prefix, str) else []
    if not 1 <= len(segs) <= 4 or not all(_PREFIX_SEGMENT_RE.fullmatch(s) for s in segs):
        raise MisuseError(f"invalid topic prefix {prefix!r}: 1-4 segments of [A-Za-z0-9._-]")
    return prefix


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


class TopicKind(enum.StrEnum):
    """What a topic carries (see docs/protocol.md for QoS and retain of each)."""

    DEVICE_DESIRED = "device_desired"
    COHORT_DESIRED = "cohort_desired"
    METADATA = "metadata"
    REQUEST = "request"
    RESPONSES = "responses"
    REPORTED = "reported"
    EVENTS = "events"
    TELEMETRY = "telemetry"
    DATASET = "dataset"


_DEVICE_LEAVES = {
    "desired": TopicKind.DEVICE_DESIRED,
    "responses": TopicKind.RESPONSES,
    "reported": TopicKind.REPORTED,
    "events": TopicKind.EVENTS,
    "telemetry": TopicKind.TELEMETRY,
    "dataset": TopicKind.DATASET,
}


@dataclass(frozen=True)
class ParsedTopic:
    """A topic split into its kind and the ids it names (device, cohort or metadata file)."""

    kind: TopicKind
    device_id: str | None = None
    cohort: str | None = None
    name: str | None = None


def parse_topic(prefix: str, topic: str) -> ParsedTopic:
    """Split `topic` under `prefix` into kind and ids; raise MessageError for anything else."""
    base = f"{prefix}/{PROTOCOL_VERSION}/"
    if not isinstance(topic, str) or not topic.startswith(base) or len(topic) > 512:
        raise MessageError(f"topic {topic!r} is not under {base!r}")
    parts = topic[len(base) :].split("/")
    if any(p == "" or p in ("+", "#") or "$" in p for p in parts):
        raise MessageError(f"topic {topic!r} has an empty or wildcard level")
    match parts:
        case ["devices", dev, leaf] if leaf in _DEVICE_LEAVES and ID_RE.fullmatch(dev):
            return ParsedTopic(_DEVICE_LEAVES[leaf], device_id=dev)
        case ["cohorts", cohort, "desired"] if ID_RE.fullmatch(cohort):
            return ParsedTopic(TopicKind.COHORT_DESIRED, cohort=cohort)
        case ["repo", "metadata", name] if METADATA_NAME_RE.fullmatch(name):
            return ParsedTopic(TopicKind.METADATA, name=name)
        case ["repo", "requests", dev] if ID_RE.fullmatch(dev):
            return ParsedTopic(TopicKind.REQUEST, device_id=dev)
    raise MessageError(f"topic {topic!r} is not part of the {PROTOCOL_VERSION} tree")


class Topics:
    """Every topic one device (or the fleet, with `device_id=None`) publishes or subscribes to."""

    def __init__(self, prefix: str, device_id: str | None = None) -> None:
        self.prefix = validate_prefix(prefix)
        self.root = f"{prefix}/{PROTOCOL_VERSION}"
        self.device_id = validate_id(device_id) if device_id is not None else None

    def _dev(self, device_id: str | None) -> str:
        dev = device_id if device_id is not None else self.device_id
        if dev is None:
            raise MisuseError("no device id given and Topics has none")
        return validate_id(dev)

    def desired(self, device_id: str | None = None) -> str:
        return f"{self.root}/devices/{self._dev(device_id)}/desired"

    def cohort_desired(self, cohort: str) -> str:
        return f"{self.root}/cohorts/{validate_id(cohort, 'cohort')}/desired"

    def metadata(self, name: str) -> str:
        if not METADATA_NAME_RE.fullmatch(name):
            raise MisuseError(f"invalid metadata file name {name!r}")
        return f"{self.root}/repo/metadata/{name}"

    def requests(self, device_id: str | None = None) -> str:
        return f"{self.root}/repo/requests/{self._dev(device_id)}"

    def responses(self, device_id: str | None = None) -> str:
        return f"{self.root}/devices/{self._dev(device_id)}/responses"

    def reported(self, device_id: str | None = None) -> str:
        return f"{self.root}/devices/{self._dev(device_id)}/reported"

    def events(self, device_id: str | None = None) -> str:
        return f"{self.root}/devices/{self._dev(device_id)}/events"

    def telemetry(self, device_id: str | None = None) -> str:
        return f"{self.root}/devices/{self._dev(device_id)}/telemetry"

    def dataset(self, device_id: str | None = None) -> str:
        """Chunks of a sample collected under a signed policy (`agent.contract.collect`)."""
        return f"{self.root}/devices/{self._dev(device_id)}/dataset"

    # --- fleet-side wildcard filters ---------------------------------------------------
    def all_requests(self, share_group: str | None = None) -> str:
        """`.../repo/requests/+`, as `$share/<group>/...` when several publishers split the load."""
        flt = f"{self.root}/repo/requests/+"
        return f"$share/{validate_id(share_group, 'share group')}/{flt}" if share_group else flt

    def all_devices(self, leaf: Literal["reported", "events", "telemetry", "dataset"],
                    share_group: str | None = None) -> str:
        """`.../devices/+/<leaf>`, as `$share/<group>/...` when several ingest workers split the load."""
        flt = f"{self.root}/devices/+/{leaf}"
        return f"$share/{validate_id(share_group, 'share group')}/{flt}" if share_group else flt


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
