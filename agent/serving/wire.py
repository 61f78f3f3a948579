"""The binary predict frame of the Unix-socket API ("EFB1"): fixed header, raw tensors, no JSON.

Why a second frame beside the JSON-headed "EFI1" one: at batch 1 the JSON header, its
descriptors and the per-request dicts around them cost more than the model (see "Where the
time goes" in docs/inference-api.md). A fixed little-endian header that C can read with one
`struct`, descriptors whose bytes are cached as a key, and tensors received straight into a
reused buffer bring a request to a few dictionary look-ups. Both frames are served on the same
socket (the magic tells them apart); EFI1 stays for the rare JSON operations (model, health,
feedback) and for older clients.

This module holds the layout and the socket plumbing both ends share (`FrameReader`, kernel
timeouts): it imports numpy and the agent's errors, nothing of the servers, so the client
(`agent.inference_client`) stays light. Layout (all little-endian):

    header  <4sBBHHHIII  24 bytes: magic "EFB1", kind, flags, status, n_arrays, reserved (0),
                         meta_len, desc_len, payload_len
    meta    meta_len bytes (kind-specific, see below; empty in requests)
    desc    n_arrays descriptors: <BBH dtype code, ndim, name_len; ndim x u32 dims; name (UTF-8)
    payload the tensors, C order, back to back, each prod(dims) * itemsize bytes

kind 1 = predict request, 2 = predict reply (meta: <IHHH id count, name, version and first
prediction id lengths, then those three UTF-8 strings back to back), 3 = error reply (meta:
<HH code and message lengths, then both; flags bit 0 = the server closes the connection).
"""

from __future__ import annotations

import math
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.errors import (
    EdgefleetError,
    InputValidationError,
    MessageError,
    NoModelLoadedError,
    RequestTooLargeError,
    RuntimeFailure,
    TransportError,
)
from agent.serving.api import error_body

MAGIC = b"EFB1"
HEADER = struct.Struct("<4sBBHHHIII")
DESC = struct.Struct("<BBH")
REPLY_META = struct.Struct("<IHHH")  # id count, name, version and first-id lengths
ERROR_META = struct.Struct("<HH")  # code and message lengths
KIND_PREDICT, KIND_REPLY, KIND_ERROR = 1, 2, 3
FLAG_CLOSE = 1
MAX_ARRAYS = 64
MAX_NDIM = 8

# ONNX TensorProto.DataType numbers, so a C or C++ application on onnxruntime already knows them.
DTYPE_CODES: dict[int, np.dtype[Any]] = {
    1: np.dtype("float32"), 2: np.dtype("uint8"), 3: np.dtype("int8"), 4: np.dtype("uint16"),
    5: np.dtype("int16"), 6: np.dtype("int32"), 7: np.dtype("int64"), 9: np.dtype("bool"),
    10: np.dtype("float16"), 11: np.dtype("float64"), 12: np.dtype("uint32"),
}
CODE_OF: dict[np.dtype[Any], int] = {dt: code for code, dt in DTYPE_CODES.items()}

#: One decoded descriptor: name, dtype, shape, element count.
Layout = tuple[tuple[str, np.dtype[Any], tuple[int, ...], int], ...]

_CACHE_MAX = 1024
_layouts: dict[bytes, tuple[Layout, int]] = {}
_descs: dict[tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...], bytes] = {}


def parse_desc(desc: bytes, n_arrays: int) -> tuple[Layout, int]:
    """Descriptors to a layout and the payload size it needs; cached by the descriptor bytes.

    Raises `MessageError` for a descriptor block that is truncated, has trailing bytes, an
    unknown dtype code, too many dimensions or a name that is not UTF-8.
    """
    cached = _layouts.get(desc)
    if cached is not None and len(cached[0]) == n_arrays:
        return cached
    if n_arrays > MAX_ARRAYS:
        raise MessageError(f"{n_arrays} arrays in one frame, the limit is {MAX_ARRAYS}")
    out = []
    pos, need = 0, 0
    for i in range(n_arrays):
        if pos + DESC.size > len(desc):
            raise MessageError(f"array descriptor {i} is truncated")
        code, ndim, name_len = DESC.unpack_from(desc, pos)
        pos += DESC.size
        dt = DTYPE_CODES.get(code)
        if dt is None:
            raise MessageError(
                f"array descriptor {i}: unknown dtype code {code}; known: {sorted(DTYPE_CODES)}"
            )
        if ndim > MAX_NDIM:
            raise MessageError(f"array descriptor {i}: {ndim} dimensions, the limit is {MAX_NDIM}")
        end = pos + 4 * ndim + name_len
        if end > len(desc):
            raise MessageError(f"array descriptor {i} is truncated")
        shape = struct.unpack_from(f"<{ndim}I", desc, pos)
        try:
            name = desc[pos + 4 * ndim:end].decode()
        except UnicodeDecodeError:
            raise MessageError(f"array descriptor {i}: name is not UTF-8") from None
        pos = end
        count = math.prod(shape)
        need += count * dt.itemsize
        out.append((name, dt, tuple(shape), count))
    if pos != len(desc):
        raise MessageError(f"descriptor block has {len(desc) - pos} bytes not describing an array")
    result = (tuple(out), need)
    if len(desc) <= 4096:
        if len(_layouts) >= _CACHE_MAX:
            _layouts.clear()
        _layouts[bytes(desc)] = result
    return result


def check_request(buf: Any, at: int, max_desc: int, max_payload: int) -> tuple[int, int, int]:
    """`(n_arrays, desc_len, payload_len)` of the predict request header at `buf[at:]`.

    Raises `MessageError` for another kind, reserved bits or meta, `RequestTooLargeError` for a
    descriptor block or payload over the limits (both before the rest of the frame is read).
    """
    _, kind, _, _, n_arrays, reserved, meta_len, desc_len, payload_len = HEADER.unpack_from(buf, at)
    if kind != KIND_PREDICT or reserved or meta_len:
        raise MessageError(
            f"EFB1 request must be kind 1 (predict) with reserved 0 and no meta, got kind {kind}"
        )
    if desc_len > max_desc:
        raise RequestTooLargeError(f"descriptor block is {desc_len} bytes, the limit is {max_desc}")
    if payload_len > max_payload:
        raise RequestTooLargeError(f"frame payload is {payload_len} bytes, the limit is {max_payload}")
    return n_arrays, desc_len, payload_len


def views(layout: Layout, payload: Any, offset: int = 0) -> dict[str, np.ndarray]:
    """Read-only arrays over `payload` (no copy; valid as long as the buffer is not reused)."""
    arrays: dict[str, np.ndarray] = {}
    for name, dt, shape, count in layout:
        arr = np.frombuffer(payload, dtype=dt, count=count, offset=offset)
        arrays[name] = arr.reshape(shape)
        offset += count * dt.itemsize
    return arrays


def describe(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The descriptor block of `arrays` (cached per names, dtypes and shapes).

    Raises `MessageError` for a dtype the wire does not carry (object, complex, strings).
    """
    key = tuple((name, arr.dtype, arr.shape) for name, arr in arrays.items())
    desc = _descs.get(key)
    if desc is None:
        parts = []
        for name, dt, shape in key:
            code = CODE_OF.get(dt)
            if code is None:
                raise MessageError(f"array {name!r}: dtype {dt} cannot be sent (numbers and bool only)")
            raw = name.encode()
            parts.append(DESC.pack(code, len(shape), len(raw)) + struct.pack(f"<{len(shape)}I", *shape) + raw)
        desc = b"".join(parts)
        if len(_descs) >= _CACHE_MAX:
            _descs.clear()
        _descs[key] = desc
    return desc


class ReplyTemplates:
    """Predict replies as `sendmsg` parts: header, meta, descriptors and the output tensors
    (no join, no tobytes). Everything but the prediction id is the same for every reply of one
    model and output layout, so it is built once and kept (bounded). Not thread-safe: one per
    serving thread, or shared where a race only rebuilds an entry."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], tuple[bytes, int, int, bytes, int]] = {}

    def parts(
        self, outputs: Mapping[str, np.ndarray], name: str, version: str, first: str, count: int
    ) -> tuple[list[Any], int]:
        """The parts of one reply and their total size. Raises `MessageError` for an output
        dtype the wire does not carry."""
        key = (name, version, tuple((k, a.dtype, a.shape) for k, a in outputs.items()))
        tpl = self._cache.get(key)
        if tpl is None:
            if len(self._cache) >= 64:
                self._cache.clear()
            n, v = name.encode()[:0xFFFF], version.encode()[:0xFFFF]
            desc = describe(outputs)
            tpl = (n + v, len(n), len(v), desc, sum(a.nbytes for a in outputs.values()))
            self._cache[key] = tpl
        named, name_len, version_len, desc, payload_len = tpl
        raw_first = first.encode()
        head = HEADER.pack(
            MAGIC, KIND_REPLY, 0, 200, len(outputs), 0,
            REPLY_META.size + len(named) + len(raw_first), len(desc), payload_len,
        ) + REPLY_META.pack(count, name_len, version_len, len(raw_first))
        bufs = [a.data if a.flags.c_contiguous else np.ascontiguousarray(a).data for a in outputs.values()]
        total = len(head) + len(named) + len(raw_first) + len(desc) + payload_len
        return [head, named, raw_first, desc, *bufs], total


def error_frame(status: int, code: str, message: str, close: bool) -> bytes:
    """An error reply (kind 3): meta is `<HH` code and message lengths, then both (UTF-8)."""
    c, m = code.encode()[:0xFFFF], message.encode()[:0xFFFF]
    meta = ERROR_META.pack(len(c), len(m)) + c + m
    return HEADER.pack(MAGIC, KIND_ERROR, FLAG_CLOSE if close else 0, status, 0, 0, len(meta), 0, 0) + meta


def error_frame_of(exc: BaseException, close: bool = False) -> bytes:
    """The error reply for `exc`: status, code and message as `api.error_body` maps them."""
    status, doc = error_body(exc)
    return error_frame(status, doc["error"]["code"], doc["error"]["message"], close)


def parse_error_meta(meta: bytes) -> tuple[str, str]:
    """Code and message of an error reply. Raises `MessageError` if the block is malformed."""
    if len(meta) < ERROR_META.size:
        raise MessageError("error meta block is truncated")
    c, m = ERROR_META.unpack_from(meta)
    if ERROR_META.size + c + m != len(meta):
        raise MessageError("error meta block does not match its lengths")
    at = ERROR_META.size
    return meta[at:at + c].decode(errors="replace"), meta[at + c:].decode(errors="replace")


def expand_ids(first: str, count: int) -> list[str]:
    """Prediction ids of a batch from the first one (`<epoch>-<n>`, consecutive)."""
    if not first or not count:
        return []
    epoch, _, n = first.rpartition("-")
    if not n.isdigit():
        return [first]
    start = int(n)
    return [f"{epoch}-{start + i}" for i in range(count)]


def raise_for_error(status: int, doc: Mapping[str, Any]) -> None:
    """Raise the agent error matching an error reply (no-op for 2xx)."""
    if status < 300:
        return
    err = doc.get("error") or {}
    code, message = str(err.get("code", "")), str(err.get("message", f"status {status}"))
    cls: type[EdgefleetError]
    if status == 413:
        cls = RequestTooLargeError
    elif status == 400 and code == "invalid_input":
        cls = InputValidationError
    elif 400 <= status < 500:
        cls = MessageError
    elif status == 503 and code == "no_model":
        cls = NoModelLoadedError
    elif status == 503:
        cls = TransportError
    else:
        cls = RuntimeFailure
    raise cls(f"{message} (HTTP-style status {status}, {code})")


def parse_reply_meta(meta: bytes) -> tuple[str, str, str, int]:
    """Model name, version, first prediction id and id count of a predict reply.

    Raises `MessageError` if the block is malformed.
    """
    if len(meta) < REPLY_META.size:
        raise MessageError("reply meta block is truncated")
    count, n, v, i = REPLY_META.unpack_from(meta)
    at = REPLY_META.size
    if at + n + v + i != len(meta):
        raise MessageError("reply meta block does not match its lengths")
    text = meta[at:].decode(errors="replace") if meta.isascii() else None
    if text is not None:
        return text[:n], text[n:n + v], text[n + v:], count
    return (meta[at:at + n].decode(errors="replace"), meta[at + n:at + n + v].decode(errors="replace"),
            meta[at + n + v:].decode(errors="replace"), count)


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Idle/send timeouts enforced by the kernel (`SO_RCVTIMEO`/`SO_SNDTIMEO`) on a blocking socket.

    Why not `settimeout`: a Python-level timeout turns every `recv` into `poll` + `recv`, one
    more system call per request on each side; the kernel timer costs nothing until it fires,
    and then `recv` fails with `EAGAIN` (an `OSError`), which closes the connection.
    """
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class FrameReader:
    """Frames from a socket, received straight into one reused buffer (`recv_into`).

    A batch-1 request arrives in one `recv_into`; its tensors are then `np.frombuffer` views
    of this buffer, valid until the next frame is read on this connection (a predictor that
    keeps inputs beyond the call must copy them, as shadow mode does). The buffer grows, by
    replacement never by resizing (numpy views may still export the old one), for frames
    larger than it, up to the limits checked before receiving.
    """

    def __init__(self, conn: socket.socket, size: int = 64 * 1024, spin_us: float = 0.0) -> None:
        self.conn = conn
        self.spin_ns = int(spin_us * 1000)
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def fill(self, n: int) -> bool:
        """Make `n` bytes available from `start`. False on a clean EOF between frames.

        Raises `MessageError` when the peer closes mid-frame, `OSError` when the socket fails.
        """
        while self.end - self.start < n:
            if self.start + n > len(self.buf):
                have = self.end - self.start
                pending = bytes(self.view[self.start:self.end])
                if n > len(self.buf):
                    self.buf = bytearray(max(n, 2 * len(self.buf)))
                    self.view = memoryview(self.buf)
                self.buf[:have] = pending
                self.start, self.end = 0, have
            got = self._spin() if self.spin_ns else None
            if got is None:
                got = self.conn.recv_into(self.view[self.end:])
            if not got:
                if self.end == self.start:
                    return False
                raise MessageError(f"connection closed mid-frame ({self.end - self.start} of {n} bytes)")
            self.end += got
        return True

    def _spin(self) -> int | None:
        """Poll without blocking for up to `spin_ns`; None when nothing came (then block)."""
        deadline = time.perf_counter_ns() + self.spin_ns
        view = self.view[self.end:]
        while True:
            try:
                return self.conn.recv_into(view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter_ns() > deadline:
                    return None

    def take(self, n: int) -> int:
        """Consume `n` available bytes; returns the offset of the first one in `buf`."""
        at = self.start
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0
        return at
