"""Micro-batching on the Unix socket: one event-loop thread, concurrent requests in one run.

Why a loop and not the connection threads: with one thread per connection every request
costs the server a thread wake-up and a GIL hand-off, and 16 busy clients mean 16 threads
taking turns at a 12 µs `session.run` each (see "Where the time goes" in
docs/inference-api.md). Here a single thread waits on every connection at once (epoll),
reads each ready connection's next EFB1 predict frame, runs the requests that share a
layout as one batch (their rows concatenated on axis 0, one `session.run`), and answers
each with its own rows and prediction ids. Under load the thread never sleeps, so the
server pays no wake-ups of its own.

Off by default (`BatchConfig` None in `UnixInferenceServer`): for a single client it adds a
`epoll_wait` per request and nothing else. Rules that keep it correct:

- which requests share a run, and what each gets back, is decided in
  `agent.serving.batch_run` (stacking rules, re-runs one by one, ids per request);
- at most one request per connection per batch, so each connection's replies keep their
  order (pipelined frames wait in the buffer for the next batch);
- one model per batch (`InferenceService.target()`), so a swap mid-batch is seen by the next;
- a reply the socket cannot take at once is kept and sent when writable, and that connection
  is not read until it is (backpressure); idle connections close after `idle_timeout_s`.

`window_us` > 0 waits that long after the first request for more (polling without blocking:
`epoll_wait` cannot sleep less than a millisecond); 0 batches only what has already arrived.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.errors import MessageError
from agent.serving import batch_run, wire
from agent.serving.api import SLOT_WAIT_S, ApiLimits, InferenceService, error_body
from agent.serving.batch_run import BatchConfig
from agent.serving.efi1 import FRAME, decode_frame_body, encode_frame, parse_prefix
from agent.serving.shm_offer import ShmOffer

#: Answers one decoded EFI1 frame (JSON header and arrays) with a whole reply frame.
JsonDispatch = Callable[[dict[str, Any], dict[str, np.ndarray]], bytes]

_SWEEP_S = 1.0
_WAIT_POLL_S = 0.01  # how often connections waiting for a slot look again


class _Conn:
    __slots__ = ("buf", "busy", "closing", "end", "last", "need", "out", "sock", "start", "view")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.buf = bytearray(64 * 1024)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.need = 0  # bytes the frame at `start` needs (0: unknown yet)
        self.out = b""  # reply bytes the socket could not take yet
        self.last = now
        self.busy = False  # a request of this connection is in the batch being gathered
        self.closing = False  # close once `out` is sent (after a fatal error frame)


class BatchLoop:
    """Serves every connection of `listener` on the calling thread until `stop()`."""

    def __init__(
        self, listener: socket.socket, service: InferenceService, config: BatchConfig, dispatch: JsonDispatch,
        replies: wire.ReplyTemplates, shm: ShmOffer | None = None,
    ) -> None:
        self.listener = listener
        self.shm = shm
        self.service = service
        self.limits: ApiLimits = service.limits
        self.config = config
        self.dispatch = dispatch
        self.replies = replies
        self.batches = self.batched_requests = 0  # counters, for tests and benchmarks
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._conns: dict[int, _Conn] = {}
        self._backlog: list[_Conn] = []
        self._pending: list[batch_run.Request] = []
        self._waiting: list[tuple[socket.socket, float]] = []  # over the limit, until a slot frees
        self._handed = 0  # shared-memory channels handed to the poller and still open
        self._handed_lock = threading.Lock()
        self._stopping = False

    def stop(self) -> None:
        """Ask the loop to end (it closes every connection); returns at once."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.listener.setblocking(False)
        self._wake_r.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        next_sweep = time.monotonic() + _SWEEP_S
        try:
            while not self._stopping:
                self._poll(0 if self._backlog else _WAIT_POLL_S if self._waiting else _SWEEP_S)
                if self._waiting:
                    self._admit_waiting(time.monotonic())
                backlog, self._backlog = self._backlog, []
                for c in backlog:
                    if not c.busy and c.sock.fileno() >= 0:
                        self._parse(c)
                if self._pending and self.config.window_us:
                    self._gather()
                if self._pending:
                    self._run_batch()
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + _SWEEP_S
        finally:
            for c in list(self._conns.values()):
                self._close(c)
            for sock, _ in self._waiting:
                sock.close()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _poll(self, timeout: float) -> None:
        now = time.monotonic()
        for key, events in self._sel.select(timeout):
            sock = key.fileobj
            if sock is self.listener:
                self._accept(now)
            elif sock is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            else:
                c = self._conns.get(key.fd)
                if c is None:
                    continue
                if events & selectors.EVENT_WRITE:
                    self._flush(c)
                if events & selectors.EVENT_READ and not c.busy and not c.out and self._recv(c, now):
                    self._parse(c)

    def _gather(self) -> None:
        """Poll (without blocking) for more requests until the window is spent or the batch is full."""
        deadline = time.perf_counter_ns() + int(self.config.window_us * 1000)
        while sum(r.rows for r in self._pending) < self.config.max_rows and time.perf_counter_ns() < deadline:
            self._poll(0)

    # -- connections ----------------------------------------------------------------------
    def _accept(self, now: float) -> None:
        """Accept every connection waiting; beyond `max_connections` they wait for a slot."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._stopping = True
                return
            if self._waiting or self._free_slots() <= 0:
                self._waiting.append((sock, now + SLOT_WAIT_S))
                continue
            self._admit(sock, now)

    def _free_slots(self) -> int:
        return self.limits.max_connections - len(self._conns) - self._handed

    def _admit(self, sock: socket.socket, now: float) -> None:
        sock.setblocking(False)
        self._conns[sock.fileno()] = _Conn(sock, now)
        self._sel.register(sock, selectors.EVENT_READ, None)

    def _admit_waiting(self, now: float) -> None:
        """Give freed slots to the connections waiting in order; answer busy past their wait."""
        while self._waiting and self._free_slots() > 0:
            self._admit(self._waiting.pop(0)[0], now)
        while self._waiting and self._waiting[0][1] <= now:
            sock = self._waiting.pop(0)[0]
            busy = {"status": 503, "error": {"code": "busy", "message": "too many connections"}}
            with contextlib.suppress(OSError):
                sock.sendall(encode_frame(busy))
            sock.close()

    def _channel_closed(self) -> None:
        """Called by the poller's thread when a channel handed over is closed: its slot frees."""
        with self._handed_lock:
            self._handed -= 1
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _close(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0:
            self._conns.pop(fd, None)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(c.sock)
        c.sock.close()

    def _sweep(self, now: float) -> None:
        """Close connections idle (or unable to take their replies) for `idle_timeout_s`."""
        for c in list(self._conns.values()):
            if now - c.last > self.limits.idle_timeout_s:
                self._close(c)

    def _recv(self, c: _Conn, now: float) -> bool:
        """Receive what is there into the connection's buffer; False when it closed."""
        room = len(c.buf) - c.end
        if room < max(c.need - (c.end - c.start), 1):
            have = c.end - c.start
            pending = bytes(c.view[c.start:c.end])
            if max(c.need, have + 1) > len(c.buf):  # grow by replacement: old views stay valid
                c.buf = bytearray(max(c.need, 2 * len(c.buf)))
                c.view = memoryview(c.buf)
            c.buf[:have] = pending
            c.start, c.end = 0, have
        try:
            got = c.sock.recv_into(c.view[c.end:])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._close(c)
            return False
        if not got:
            if c.end > c.start and not c.busy:  # the peer stopped mid-frame: say so, then close
                binary = c.buf[c.start:c.start + 4] == wire.MAGIC
                have = c.end - c.start
                self._fatal(c, 400, "bad_request", f"connection closed mid-frame ({have} bytes of a frame)",
                            binary)  # closes once sent
                return False
            self._close(c)
            return False
        c.end += got
        c.last = now
        return True

    def _send(self, c: _Conn, parts: list[Any], total: int) -> None:
        """Send a reply, or keep what the socket cannot take and wait until it is writable."""
        if c.out:
            c.out += b"".join(bytes(p) for p in parts)
            return
        try:
            sent = c.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(c)
            return
        if sent < total:
            c.out = b"".join(bytes(p) for p in parts)[sent:]
            self._sel.modify(c.sock, selectors.EVENT_WRITE, None)
        elif c.closing:
            self._close(c)

    def _flush(self, c: _Conn) -> None:
        try:
            sent = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        c.out = c.out[sent:]
        c.last = time.monotonic()
        if not c.out:
            if c.closing:
                self._close(c)
                return
            self._sel.modify(c.sock, selectors.EVENT_READ, None)
            self._backlog.append(c)  # frames may wait in its buffer

    def _fatal(self, c: _Conn, status: int, code: str, message: str, binary: bool) -> None:
        """An error after which the stream is out of sync: answer, then close."""
        c.closing = True
        c.start = c.end = 0
        if binary:
            frame = wire.error_frame(status, code, message, True)
        else:
            doc = {"status": status, "error": {"code": code, "message": message}, "close": True}
            frame = encode_frame(doc)
        self._send(c, [frame], len(frame))

    # -- frames -----------------------------------------------------------------------------
    def _parse(self, c: _Conn) -> None:
        """Answer the buffered EFI1 frames and queue the next EFB1 predict (one per batch)."""
        while not c.closing and c.end - c.start >= 4:
            if c.buf[c.start:c.start + 4] == wire.MAGIC:
                if self._parse_binary(c):
                    return
            elif not self._parse_json(c):
                return

    def _parse_binary(self, c: _Conn) -> bool:
        """True when the frame was queued, is incomplete, or ended the connection."""
        if c.end - c.start < wire.HEADER.size:
            c.need = wire.HEADER.size
            return True
        try:
            n_arrays, desc_len, payload_len = wire.check_request(
                c.buf, c.start, self.limits.max_header_bytes, self.limits.max_body_bytes
            )
        except MessageError as exc:
            status, doc = error_body(exc)
            self._fatal(c, status, doc["error"]["code"], doc["error"]["message"], True)
            return True
        total = wire.HEADER.size + desc_len + payload_len
        if c.end - c.start < total:
            c.need = total
            return True
        at = c.start + wire.HEADER.size
        c.start += total
        c.need = 0
        try:
            layout, need = wire.parse_desc(bytes(c.view[at:at + desc_len]), n_arrays)
            if need != payload_len:
                raise MessageError(f"payload is {payload_len} bytes, the descriptors need {need}")
            arrays = wire.views(layout, c.buf, at + desc_len)
            self.service.check_rows(arrays)
        except Exception as exc:
            frame = wire.error_frame_of(exc)
            self._send(c, [frame], len(frame))
            return False
        c.busy = True
        self._pending.append(batch_run.Request(c, arrays))
        return True

    def _parse_json(self, c: _Conn) -> bool:
        """Answer one EFI1 frame; False when it is incomplete or ended the connection."""
        if c.end - c.start < FRAME.size:
            c.need = FRAME.size
            return False
        try:
            head_len, payload_len = parse_prefix(bytes(c.view[c.start:c.start + FRAME.size]), self.limits)
        except Exception as exc:
            status, doc = error_body(exc)
            self._fatal(c, status, doc["error"]["code"], doc["error"]["message"], False)
            return False
        total = FRAME.size + head_len + payload_len
        if c.end - c.start < total:
            c.need = total
            return False
        at = c.start + FRAME.size
        c.start += total
        c.need = 0
        try:
            header, arrays = decode_frame_body(
                bytes(c.view[at:at + head_len]), bytes(c.view[at + head_len:at + head_len + payload_len])
            )
            if header.get("op") == "shm_open":
                self._hand_over(c, header)  # raises MessageError (answered here) when refused
                return False
            reply = self.dispatch(header, arrays)
        except Exception as exc:
            status, doc = error_body(exc)
            reply = encode_frame({"status": status, **doc})
        self._send(c, [reply], len(reply))
        return not c.closing

    def _hand_over(self, c: _Conn, header: dict[str, Any]) -> None:
        """Turn the connection into a shared-memory channel served by the offer's poller
        (which then stacks the channels' requests as this loop does). Raises `MessageError`
        while the connection is still ours when the channel is not offered or asked wrongly."""
        if self.shm is None:
            raise MessageError("this server does not offer shared memory (op shm_open); use the socket")
        if c.end != c.start or c.out:
            raise MessageError("shm_open must be the last frame the client sent before the reply")
        geo = self.shm.geometry(header, c.sock)
        self._conns.pop(c.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.closing = True  # nothing more of this loop's for it
        c.sock.setblocking(True)
        with self._handed_lock:
            self._handed += 1  # the channel keeps the connection's slot until it is closed
        self.shm.open(c.sock, geo, self._channel_closed)

    # -- batches ----------------------------------------------------------------------------
    def _run_batch(self) -> None:
        pending, self._pending = self._pending, []
        replies, batches, batched = batch_run.run(self.service, pending, self.config.max_rows, self.replies)
        self.batches += batches
        self.batched_requests += batched
        for c, parts, total in replies:
            if c.sock.fileno() >= 0:
                self._send(c, parts, total)
        for r in pending:
            c = r.owner
            c.busy = False
            if c.end - c.start >= 4 and not c.out and not c.closing:
                self._backlog.append(c)  # a pipelined frame is already here
