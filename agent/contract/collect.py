"""Opt-in data collection: the policy a signed director document carries, and its upload chunks.

Why in the director document: collecting inputs is the one thing that moves raw data off a
device, so it must be asked for by the same signed, sequenced, expiring document that says
which model to run; a device collects nothing without one (`agent.telemetry.collect`).
The sample travels as a `.npz` archive cut into chunks, each naming its upload and its place,
so an interrupted upload resumes at the first chunk not yet acknowledged and the fleet checks
the whole archive against the sha256 every chunk carries.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import cbor2

from agent.contract.strict import Meta, StrictStruct
from agent.errors import MessageError

CHUNK_VERSION = 1
MAX_CHUNK_BYTES = 192 * 1024  # below the MQTT message limit with room for the envelope
MAX_CHUNKS = 4096
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CollectPolicy(StrictStruct, frozen=True, kw_only=True):
    """What a device should keep of its inputs, and the caps it must never exceed.

    `strategy`: `reservoir` keeps a uniform sample of every row served; `low_confidence` keeps
    the rows whose top-class confidence was lowest (hard examples; needs a classifier).
    Caps: `max_rows`, `max_bytes` (of kept feature values, 8 bytes each plus 8 for confidence
    and 8 for the label),
    `max_seconds` after the device accepted the policy. `only_while_drift`: the fleet keeps the
    policy in the cohort's document only while a drift episode is open (the device obeys the
    document it has; it does not judge drift itself).
    """

    policy_id: Annotated[str, Meta(min_length=1, max_length=64)]
    strategy: Literal["reservoir", "low_confidence"] = "reservoir"
    max_rows: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    max_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 4 * 1024 * 1024
    max_seconds: Annotated[int, Meta(ge=1, le=7 * 86400)] = 3600  # int: canonical JSON has no floats
    only_while_drift: bool = False
    chunk_bytes: Annotated[int, Meta(ge=1024, le=MAX_CHUNK_BYTES)] = 64 * 1024
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] = 0

    def _check(self) -> None:
        if not _ID.fullmatch(self.policy_id):
            raise ValueError("policy_id must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class DatasetChunk:
    """One piece of an uploaded sample: `index` of `total`, all sharing `upload_id` and the
    sha256 of the whole archive."""

    policy_id: str
    device_id: str
    upload_id: str
    index: int
    total: int
    sha256: str
    data: bytes


def encode_chunk(c: DatasetChunk) -> bytes:
    """CBOR `[version, policy_id, device_id, upload_id, index, total, sha256, data]`."""
    return cbor2.dumps([CHUNK_VERSION, c.policy_id, c.device_id, c.upload_id, c.index, c.total, c.sha256,
                        c.data])


def decode_chunk(payload: bytes) -> DatasetChunk:
    """Decode and bound an untrusted chunk. Raises `MessageError`."""
    if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_CHUNK_BYTES + 1024:
        raise MessageError("dataset chunk: not bytes or too large")
    try:
        v: Any = cbor2.loads(bytes(payload))
    except Exception as exc:  # cbor2 raises several types on bad input; all mean "malformed"
        raise MessageError(f"dataset chunk: malformed CBOR ({type(exc).__name__})") from None
    if not isinstance(v, list) or len(v) != 8 or v[0] != CHUNK_VERSION:
        raise MessageError("dataset chunk: expected [1, policy, device, upload, index, total, sha256, data]")
    _, policy, device, upload, index, total, digest, data = v
    texts = (policy, device, upload)
    if not all(isinstance(t, str) and _ID.fullmatch(t) for t in texts):
        raise MessageError("dataset chunk: bad policy, device or upload id")
    if type(index) is not int or type(total) is not int or not 0 <= index < total <= MAX_CHUNKS:
        raise MessageError(f"dataset chunk: index must be in 0..total-1, total at most {MAX_CHUNKS}")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise MessageError("dataset chunk: sha256 must be 64 lowercase hex digits")
    if not isinstance(data, bytes) or not data or len(data) > MAX_CHUNK_BYTES:
        raise MessageError(f"dataset chunk: data must be 1..{MAX_CHUNK_BYTES} bytes")
    return DatasetChunk(policy, device, upload, index, total, digest, data)
