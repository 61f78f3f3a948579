"""The JSON-headed "EFI1" frame of the Unix-socket API, shared by the server and the client.

Every message is `magic "EFI1" | u32 header length | u32 payload length` (big-endian), a
UTF-8 JSON header, then the payload: the arrays listed in the header, raw C-order
little-endian bytes, back to back (docs/inference-api.md). It carries the JSON operations
(model, health, feedback) and older clients; predictions go as binary EFB1 frames
(`agent.serving.wire`). Moved here from `agent.serving.api`, which keeps the
transport-independent service.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Hashable, Mapping
from typing import Any, Protocol

import numpy as np

from agent.errors import MessageError, RequestTooLargeError


class FrameLimits(Protocol):
    """What `parse_prefix` bounds (`agent.serving.api.ApiLimits` is one)."""

    @property
    def max_header_bytes(self) -> int: ...

    @property
    def max_body_bytes(self) -> int: ...


FRAME = struct.Struct("!4sII")
MAGIC = b"EFI1"
# dtypes a request may carry: numeric and bool only, never object (no pickles, no pointers).
WIRE_DTYPES = frozenset(
    ["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "uint16", "uint32", "bool"]
)
_DTYPES = {name: np.dtype(name) for name in WIRE_DTYPES}
if sys.byteorder != "little":  # pragma: no cover - every supported edge target is little-endian
    raise ImportError("the inference API's raw framing assumes a little-endian host")


# --- Unix-socket framing (shared by server and client) ---------------------------------------
# Hot-path caches: a client sends the same header for every same-shaped request and the server
# answers with the same header, so JSON work is done once per (shape, model) rather than per call.
_HEAD_CACHE_MAX = 1024
_encoded_heads: dict[Hashable, bytes] = {}
_decoded_heads: dict[bytes, tuple[dict[str, Any], list[tuple[str, np.dtype[Any], tuple[int, ...], int]]]] = {}


def encode_frame(
    header: dict[str, Any], arrays: Mapping[str, np.ndarray] | None = None, cache_key: Hashable | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """One framed message: prefix, JSON header (with array descriptors added) and raw payload.

    `cache_key` must identify `header` completely (without its arrays); headers are then
    encoded once per key and array layout. `extra` holds per-message header fields (the
    prediction ids) spliced into the cached header, so the cache still pays.
    """
    parts: list[bytes] = []
    descs: list[tuple[str, str, tuple[int, ...]]] = []
    if arrays:
        for name, arr in arrays.items():
            descs.append((name, arr.dtype.name, arr.shape))
            parts.append(arr.tobytes())  # C order whatever the array's layout
    key = (cache_key, tuple(descs)) if cache_key is not None else None
    head = _encoded_heads.get(key) if key is not None else None
    if head is None:
        full = (
            {**header, "arrays": [{"name": n, "dtype": d, "shape": s} for n, d, s in descs]}
            if descs
            else header
        )
        head = json.dumps(full, separators=(",", ":")).encode()
        if key is not None:
            if len(_encoded_heads) >= _HEAD_CACHE_MAX:
                _encoded_heads.clear()
            _encoded_heads[key] = head
    if extra:
        head = head[:-1] + b"," + json.dumps(extra, separators=(",", ":")).encode()[1:]
    payload = parts[0] if len(parts) == 1 else b"".join(parts)
    return FRAME.pack(MAGIC, len(head), len(payload)) + head + payload


def parse_prefix(prefix: bytes, limits: FrameLimits) -> tuple[int, int]:
    """Header and payload lengths from a frame prefix. Raises `MessageError`/`RequestTooLargeError`."""
    magic, head_len, payload_len = FRAME.unpack(prefix)
    if magic != MAGIC:
        raise MessageError(f"bad frame magic {magic!r}, expected {MAGIC!r}")
    if head_len > limits.max_header_bytes:
        raise RequestTooLargeError(
            f"frame header is {head_len} bytes, the limit is {limits.max_header_bytes}"
        )
    if payload_len > limits.max_body_bytes:
        raise RequestTooLargeError(
            f"frame payload is {payload_len} bytes, the limit is {limits.max_body_bytes}"
        )
    return head_len, payload_len


def _parse_head(head: bytes) -> tuple[dict[str, Any], list[tuple[str, np.dtype[Any], tuple[int, ...], int]]]:
    try:
        header = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"frame header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise MessageError("frame header must be a JSON object")
    layout = []
    for desc in header.pop("arrays", None) or []:
        try:
            name, dtype, shape = str(desc["name"]), str(desc["dtype"]), tuple(int(d) for d in desc["shape"])
        except (KeyError, TypeError, ValueError):
            raise MessageError('each array needs "name", "dtype" and an integer "shape"') from None
        dt = _DTYPES.get(dtype)
        if dt is None:
            raise MessageError(f"array {name!r}: dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
        if any(d < 0 for d in shape):
            raise MessageError(f"array {name!r}: negative dimension in shape {list(shape)}")
        layout.append((name, dt, shape, math.prod(shape)))
    return header, layout


def decode_frame_body(head: bytes, payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON header (a fresh dict) and its arrays (read-only views of `payload`).

    Raises `MessageError` for a malformed header or a payload that does not match it.
    """
    cached = _decoded_heads.get(head)
    if cached is None:
        cached = _parse_head(head)
        if len(head) <= 4096:  # only small headers are worth keeping
            if len(_decoded_heads) >= _HEAD_CACHE_MAX:
                _decoded_heads.clear()
            _decoded_heads[head] = cached
    header, layout = cached
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, dt, shape, count in layout:
        end = offset + count * dt.itemsize
        if end > len(payload):
            raise MessageError(f"array {name!r}: shape {list(shape)} needs more bytes than the payload holds")
        arrays[name] = np.frombuffer(payload, dtype=dt, count=count, offset=offset).reshape(shape)
        offset = end
    if offset != len(payload):
        raise MessageError(f"payload has {len(payload) - offset} bytes not described by the header")
    return dict(header), arrays
