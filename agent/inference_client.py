"""The Python client of the agent's local inference API (Unix socket), for applications on the gateway.

Why a module of its own at the top of `agent`: an application imports this and nothing of the
daemon. It needs numpy and the agent's error classes; predict requests go as binary EFB1
frames (`agent.serving.wire`: fixed header, raw tensors, one `sendmsg`, replies received into
a reused buffer), the rare JSON operations (model, health, feedback) as EFI1 frames on the same
connection. Error replies become the agent's errors (`InputValidationError`, ...), so
`except InputValidationError` works the same in-process and over the socket. Not thread-safe:
one client per thread (the server runs each connection on its own thread).

Where the agent offers it (x86-64 Linux, `agent.serving.shm_layout`), the connection becomes
a shared-memory channel on the first call (`transport="auto"`, the default): predicts then go
through the region and the socket is only its doorbell, while the JSON operations and
frames too large for the region use a second, plain connection. `transport="socket"` keeps
to the socket; `"shm"` refuses to fall back.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from agent.errors import MessageError, MisuseError, TransportError
from agent.serving import wire
from agent.serving.api import ApiLimits
from agent.serving.efi1 import FRAME, MAGIC, decode_frame_body, encode_frame, parse_prefix
from agent.serving.shm_client import DEFAULT_SHM_SPIN_US, ShmLink
from agent.serving.shm_layout import DEFAULT_AREA_BYTES
from agent.serving.shm_layout import supported as shm_supported
from agent.serving.wire import raise_for_error

__all__ = ["InferenceClient", "raise_for_error"]


#: How long a client polls for its reply before sleeping in `recv`, by default (0 = always
#: sleep). Polling cuts a round trip by a third on an idle machine (waking a sleeping thread
#: costs more than the request, see "Where the time goes" in docs/inference-api.md) but
#: costs the server CPU on a busy one, and many polling threads of one process on few cores
#: lower throughput: opt in per client (`spin_us=300`) for a latency-critical caller.
DEFAULT_SPIN_US = 0.0
#: One output of a known reply layout: its name and an array over the reply area where it is.
_Out = tuple[str, np.ndarray]
#: A reply's bytes before its first prediction id, where that id starts and ends in the region,
#: its bytes from the id's end to the tensors, the ids' count, and each output's name and an
#: array over the reply area where its tensor is. Without ids the id is empty.
_KnownReply = tuple[bytes, int, int, bytes, int, tuple[_Out, ...]]
POLLING_SPIN_US = 300.0


class InferenceClient:
    """One persistent connection to the Unix-socket API. Transport failures raise `TransportError`.

    `spin_us`: poll the socket this long for a reply before blocking (see `DEFAULT_SPIN_US`);
    `transport`: "auto" (shared memory where offered, else the socket), "socket" or "shm";
    `shm_spin_us`: on shared memory, spin this long for a reply before sleeping (yielding
    the CPU and the GIL between looks; 0: never); `shm_bytes`: the request and reply areas' size;
    `shm_one_spinner`: let one waiting thread of this process spin for every client that says
    so and wake the others (`agent.serving.shm_watch`): with many calling threads, half the p99
    for about a tenth less throughput, so it is off by default.
    """

    def __init__(
        self, path: Path | str, timeout: float = 10.0, limits: ApiLimits | None = None,
        spin_us: float = DEFAULT_SPIN_US, transport: str = "auto",
        shm_spin_us: float = DEFAULT_SHM_SPIN_US, shm_bytes: int = DEFAULT_AREA_BYTES,
        shm_one_spinner: bool = False,
    ) -> None:
        if transport not in ("auto", "socket", "shm"):
            raise MisuseError(f"transport must be auto, socket or shm, not {transport!r}")
        self.path = str(path)
        self.transport = transport
        self.shm_spin_us, self.shm_bytes, self.shm_one_spinner = shm_spin_us, shm_bytes, shm_one_spinner
        self._link: ShmLink | None = None
        self._side: InferenceClient | None = None  # plain connection beside an open channel
        # The channel's last reply decoded in full, as `_shm_reply` compares the next one to it.
        self._fast: _KnownReply | None = None
        self.spin_us = spin_us
        self.timeout = timeout
        self.limits = limits or ApiLimits(max_body_bytes=1 << 30, max_header_bytes=1 << 24)
        self._sock: socket.socket | None = None
        self._reader: wire.FrameReader | None = None
        self.last_model: dict[str, Any] = {}
        self._last_ids: tuple[str, int] = ("", 0)
        self._heads: dict[tuple[Any, ...], tuple[bytes, int]] = {}
        # Reply meta and descriptors seen before -> (name, version, prefix length) and layout:
        # the same for every reply of one model and output layout (bounded).
        self._metas: dict[bytes, tuple[str, str]] = {}

    @property
    def last_prediction_ids(self) -> list[str]:
        """Prediction ids of the last predict's rows, in row order (empty when not tracked).

        The reply carries the first id and a count (ids of a batch are consecutive); the list
        is built only when asked for.
        """
        return wire.expand_ids(*self._last_ids)

    def _connect(self) -> tuple[socket.socket, wire.FrameReader]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot connect to {self.path}: {exc}") from exc
        sock.settimeout(None)
        wire.set_kernel_timeouts(sock, self.timeout)
        self._sock, self._reader = sock, wire.FrameReader(sock, spin_us=self.spin_us)
        if self.transport != "socket":
            self._open_link(sock)
        return sock, self._reader

    def _open_link(self, sock: socket.socket) -> None:
        """Turn the fresh connection into a shared-memory channel when the agent offers one."""
        link = None
        if shm_supported():
            try:
                link = ShmLink.open(sock, self.shm_bytes, self.shm_bytes, self.shm_one_spinner)
            except TransportError:
                self.close()
                raise
        if link is None and self.transport == "shm":
            self.close()
            raise TransportError(f"{self.path} does not offer shared memory (or this machine cannot use it)")
        self._link = link

    @property
    def on_shared_memory(self) -> bool:
        """Whether predicts go through a shared-memory channel (known after the first call)."""
        return self._link is not None

    def _side_client(self) -> InferenceClient:
        """A plain socket connection for what does not go through the channel."""
        if self._side is None:
            self._side = InferenceClient(self.path, self.timeout, self.limits, self.spin_us, "socket")
        return self._side

    def _fill(self, rd: wire.FrameReader, n: int) -> None:
        try:
            ok = rd.fill(n)
        except MessageError:
            ok = False
        if not ok:
            self.close()
            raise TransportError("the server closed the connection mid-reply")

    @staticmethod
    def _send(sock: socket.socket, parts: list[Any], total: int) -> None:
        # The server may have answered (busy, too large) and closed: the reply is read anyway.
        with contextlib.suppress(OSError):
            sent = sock.sendmsg(parts)
            if sent < total:
                sock.sendall(b"".join(bytes(p) for p in parts)[sent:])

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Outputs by name for `inputs` (arrays or nested lists, batch on axis 0)."""
        arrays: dict[str, np.ndarray] = {}
        values, parts = [], []  # a loop, not comprehensions: their frames cost more than the work
        for k, v in inputs.items():
            if type(v) is not np.ndarray or not v.flags.c_contiguous:
                v = np.ascontiguousarray(v)
            arrays[k] = v
            values.append(v)
            parts.append((k, v.dtype, v.shape))
        key = tuple(parts)
        cached = self._heads.get(key)
        if cached is None:  # header + descriptors: the same for every request of this layout
            desc = wire.describe(arrays)
            payload_len = sum(a.nbytes for a in arrays.values())
            pre = wire.HEADER.pack(
                wire.MAGIC, wire.KIND_PREDICT, 0, 0, len(arrays), 0, 0, len(desc), payload_len
            ) + desc
            if len(self._heads) >= 64:
                self._heads.clear()
            cached = self._heads[key] = (pre, len(pre) + payload_len)
        pre, total = cached
        sock, rd = (self._sock, self._reader) if self._sock is not None and self._reader else self._connect()
        link = self._link
        if link is not None:
            if total > link.request_room:  # too large for the region: the plain connection
                side = self._side_client()
                out = side.predict(arrays)
                self.last_model, self._last_ids = side.last_model, side._last_ids
                return out
            try:
                link.call(pre, values, self.shm_spin_us)
            except TransportError:
                self.close()
                raise
            return self._shm_reply(link)
        try:
            try:  # the server may have answered (busy, too large) and closed: the reply is read anyway
                if len(arrays) == 1:
                    sent = sock.sendmsg([pre, next(iter(arrays.values())).data])
                else:
                    sent = sock.sendmsg([pre, *(a.data for a in arrays.values())])
                if sent < total:
                    sock.sendall(b"".join([pre, *(a.tobytes() for a in arrays.values())])[sent:])
            except OSError:
                pass
            if rd.end - rd.start < 4:
                self._fill(rd, 4)
            if rd.buf[rd.start:rd.start + 4] != wire.MAGIC:
                self._json_reply(rd)  # busy / refused before the frame was understood: raises
                raise TransportError("the server answered a predict frame with a JSON frame")
            return self._binary_reply(rd)
        except OSError as exc:
            self.close()
            raise TransportError(f"inference socket failed: {exc}") from exc

    def _shm_reply(self, link: ShmLink) -> dict[str, np.ndarray]:
        """The reply in the channel's area. When all its bytes before the tensors but the first
        prediction id are those of the last reply (the server then writes only that id and the
        tensors), the id and the outputs are read at the offsets known from it; otherwise the
        frame is decoded and checked in full."""
        region, at = link.region, link.geo.rep_offset
        fast = self._fast
        if (fast is not None and region[at:at + len(fast[0])] == fast[0]
                and region[fast[2]:fast[2] + len(fast[3])] == fast[3]):
            self._last_ids = (region[fast[1]:fast[2]].decode(errors="replace"), fast[4])
            outs = fast[5]
            if len(outs) == 1:
                return {outs[0][0]: outs[0][1].copy()}  # copies: the area is the next reply's
            return {k: view.copy() for k, view in outs}
        self._fast = None
        if region[at:at + 4] != wire.MAGIC:
            self.close()
            raise TransportError("the shared-memory reply area does not hold an EFB1 frame")
        out = self._decode_reply(region, at, link.geo.rep_size)
        meta_len, desc_len = wire.HEADER.unpack_from(region, at)[6:8]
        id_len = wire.REPLY_META.unpack_from(region, at + wire.HEADER.size)[3]
        off = at + wire.HEADER.size + meta_len + desc_len  # the tensors
        id_end = at + wire.HEADER.size + meta_len  # the id ends the meta block
        layout: list[_Out] = []
        for k, a in out.items():
            layout.append((k, np.frombuffer(region, a.dtype, a.size, off).reshape(a.shape)))
            off += a.nbytes
        self._fast = (region[at:id_end - id_len], id_end - id_len, id_end, region[id_end:id_end + desc_len],
                      self._last_ids[1], tuple(layout))
        return out

    def _binary_reply(self, rd: wire.FrameReader) -> dict[str, np.ndarray]:
        if rd.end - rd.start < wire.HEADER.size:
            self._fill(rd, wire.HEADER.size)
        total = self._frame_size(rd.buf, rd.start, 1 << 62)
        if rd.end - rd.start < total:
            self._fill(rd, total)
        return self._decode_checked(rd.buf, rd.take(total))

    def _frame_size(self, buf: Any, at: int, room: int) -> int:
        """The size of the reply frame at `buf[at:]`, checked against the limits and `room`."""
        _, _, _, _, _, _, meta_len, desc_len, payload_len = wire.HEADER.unpack_from(buf, at)
        total = wire.HEADER.size + meta_len + desc_len + payload_len
        if (meta_len + desc_len > self.limits.max_header_bytes or payload_len > self.limits.max_body_bytes
                or total > room):
            self.close()
            raise TransportError("reply frame over the client's limits")
        return total

    def _decode_reply(self, buf: Any, at: int, room: int) -> dict[str, np.ndarray]:
        """Outputs of the whole reply frame at `buf[at:]` (an error frame raises its error)."""
        self._frame_size(buf, at, room)
        return self._decode_checked(buf, at)

    def _decode_checked(self, buf: Any, at: int) -> dict[str, np.ndarray]:
        """`_decode_reply` for a frame whose size `_frame_size` has already checked."""
        _, kind, flags, status, n, _, meta_len, desc_len, payload_len = wire.HEADER.unpack_from(buf, at)
        at += wire.HEADER.size
        meta = bytes(buf[at:at + meta_len])
        try:
            if kind == wire.KIND_ERROR:
                code, message = wire.parse_error_meta(meta)
            else:
                name, version, first, count = self._reply_meta(meta)
                layout, need = wire.parse_desc(bytes(buf[at + meta_len:at + meta_len + desc_len]), n)
        except MessageError as exc:
            self.close()
            raise TransportError(f"malformed reply frame: {exc}") from exc
        if kind == wire.KIND_ERROR:
            if flags & wire.FLAG_CLOSE:
                self.close()
            raise_for_error(status if status >= 300 else 500, {"error": {"code": code, "message": message}})
        if need != payload_len:
            self.close()
            raise TransportError("reply payload does not match its descriptors")
        at += meta_len + desc_len
        out = {}
        for k, dt, shape, items in layout:  # copies: the buffer is reused by the next reply
            out[k] = np.frombuffer(buf, dt, items, at).reshape(shape).copy()
            at += items * dt.itemsize
        last = self.last_model
        if last.get("version") != version or last.get("name") != name:
            self.last_model = {"name": name, "version": version}
        self._last_ids = (first, count)
        return out

    def _reply_meta(self, meta: bytes) -> tuple[str, str, str, int]:
        """`wire.parse_reply_meta`, remembering name and version by the bytes before the id
        (they repeat on every reply). Raises `MessageError`."""
        if len(meta) >= wire.REPLY_META.size:
            count, _, _, id_len = wire.REPLY_META.unpack_from(meta)
            cut = len(meta) - id_len
            known = self._metas.get(meta[:cut]) if cut >= wire.REPLY_META.size else None
            if known is not None:  # the key holds every length, so the rest is consistent
                return known[0], known[1], meta[cut:].decode(errors="replace"), count
        name, version, first, count = wire.parse_reply_meta(meta)  # validates
        if len(self._metas) >= 64:
            self._metas.clear()
        self._metas[meta[:len(meta) - wire.REPLY_META.unpack_from(meta)[3]]] = (name, version)
        return name, version, first, count

    def _json_reply(self, rd: wire.FrameReader) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._fill(rd, FRAME.size)
        try:
            head_len, payload_len = parse_prefix(bytes(rd.view[rd.start:rd.start + FRAME.size]), self.limits)
            self._fill(rd, FRAME.size + head_len + payload_len)
            at = rd.take(FRAME.size + head_len + payload_len) + FRAME.size
            reply, out = decode_frame_body(
                bytes(rd.view[at:at + head_len]), bytes(rd.view[at + head_len:at + head_len + payload_len])
            )
        except MessageError as exc:
            self.close()
            raise TransportError(f"malformed reply frame: {exc}") from exc
        if reply.get("close"):
            self.close()
        status = int(reply.get("status", 500))
        raise_for_error(status, reply)
        return reply, {k: v.copy() for k, v in out.items()}

    def call(
        self, header: dict[str, Any], arrays: Mapping[str, np.ndarray] | None = None, cache_key: Any = None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send one EFI1 (JSON-headed) frame and return the reply's header and arrays; errors raise."""
        sock, rd = (self._sock, self._reader) if self._sock is not None and self._reader else self._connect()
        if self._link is not None:  # the channel's socket is its doorbell: the plain connection
            return self._side_client().call(header, arrays, cache_key)
        frame = encode_frame(header, arrays, cache_key)
        try:
            self._send(sock, [frame], len(frame))
            self._fill(rd, 4)
            if rd.buf[rd.start:rd.start + 4] != MAGIC:
                self._binary_reply(rd)  # an EFB1 error frame: raises
                raise TransportError("the server answered a JSON frame with a binary one")
            return self._json_reply(rd)
        except OSError as exc:
            self.close()
            raise TransportError(f"inference socket failed: {exc}") from exc

    def feedback(self, labels: Mapping[str, Any]) -> dict[str, int]:
        """Send labels for earlier predictions (`{prediction_id: label}`); returns the counts
        (`matched`, `unknown`, `expired`, `duplicate`, `invalid`)."""
        body = [{"prediction_id": k, "label": v} for k, v in labels.items()]
        return dict(self.call({"op": "feedback", "labels": body})[0]["feedback"])

    def info(self) -> dict[str, Any]:
        """The served model's info (name, version, runtime, inputs, outputs)."""
        return dict(self.call({"op": "model"})[0]["model"])

    def health(self) -> dict[str, Any]:
        """`{"status": "ok", "ready": bool, "model": {...} | None}`."""
        return dict(self.call({"op": "health"})[0]["health"])

    def close(self) -> None:
        """Close the connection (the next call reconnects)."""
        link, side, self._link, self._side, self._fast = self._link, self._side, None, None, None
        if link is not None:
            link.close()  # closes the socket too
        elif self._sock is not None:
            self._sock.close()
        if side is not None:
            side.close()
        self._sock = self._reader = None

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
