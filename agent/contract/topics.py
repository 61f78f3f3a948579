"""The MQTT topic tree of protocol v1: which topics exist, what each carries, and the ids in them.

Pure strings in and out, shared by agent and fleet. The tree is versioned
(`<prefix>/v1/...`) so a v2 can run beside it, and every id that becomes a topic level is
checked (no `/ + # $`), so no caller can build a wildcard or another device's topic by
accident. `parse_topic` raises `agent.errors.MessageError` for a topic outside the tree;
`Topics` and the `validate_*` functions raise `agent.errors.MisuseError` for bad arguments.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal

from agent.errors import MessageError, MisuseError

PROTOCOL_VERSION = "v1"

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PREFIX_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
METADATA_NAME_RE = re.compile(r"^(?:[1-9][0-9]{0,9}\.)?[a-z][a-z0-9_-]{0,63}\.json$")

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

    def _device_leaf(self, leaf: str, device_id: str | None) -> str:
        return f"{self.root}/devices/{self._dev(device_id)}/{leaf}"

    def desired(self, device_id: str | None = None) -> str:
        return self._device_leaf("desired", device_id)

    def cohort_desired(self, cohort: str) -> str:
        return f"{self.root}/cohorts/{validate_id(cohort, 'cohort')}/desired"

    def metadata(self, name: str) -> str:
        if not METADATA_NAME_RE.fullmatch(name):
            raise MisuseError(f"invalid metadata file name {name!r}")
        return f"{self.root}/repo/metadata/{name}"

    def requests(self, device_id: str | None = None) -> str:
        return f"{self.root}/repo/requests/{self._dev(device_id)}"

    def responses(self, device_id: str | None = None) -> str:
        return self._device_leaf("responses", device_id)

    def reported(self, device_id: str | None = None) -> str:
        return self._device_leaf("reported", device_id)

    def events(self, device_id: str | None = None) -> str:
        return self._device_leaf("events", device_id)

    def telemetry(self, device_id: str | None = None) -> str:
        return self._device_leaf("telemetry", device_id)

    def dataset(self, device_id: str | None = None) -> str:
        """Chunks of a sample collected under a signed policy (`agent.contract.collect`)."""
        return self._device_leaf("dataset", device_id)

    # --- fleet-side wildcard filters ---------------------------------------------------
    def all_requests(self, share_group: str | None = None) -> str:
        """`.../repo/requests/+`, as `$share/<group>/...` when several publishers split the load."""
        return _shared(f"{self.root}/repo/requests/+", share_group)

    def all_devices(self, leaf: Literal["reported", "events", "telemetry", "dataset"],
                    share_group: str | None = None) -> str:
        """`.../devices/+/<leaf>`, as `$share/<group>/...` when several ingest workers split the load."""
        return _shared(f"{self.root}/devices/+/{leaf}", share_group)


def _shared(flt: str, share_group: str | None) -> str:
    """`flt` as a shared subscription of `share_group` (the broker splits its messages)."""
    return f"$share/{validate_id(share_group, 'share group')}/{flt}" if share_group else flt
