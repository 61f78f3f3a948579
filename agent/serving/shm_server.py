"""The server's end of the shared-memory channels (EFS1): one poller thread for every channel.

Why one thread for all of them: a spinning Python thread holds the GIL, so a thread per
channel would make spinning channels take turns at the interpreter's switch interval
(5 ms). One poller scans every channel's request word, serves what is ready (stacked into
one run when micro-batching is on, `agent.serving.batch_run`), and keeps spinning for
`spin_us` after the last request; then it marks every channel parked and sleeps in
`select` on their sockets (the doorbells, see `agent.serving.shm_layout`) until a client
rings, a channel closes or a new one arrives.

Trust: the region is shared with the client, which may rewrite it at any moment, so a
request is copied out (header, descriptors, payload) before it is checked and run, and
every length is checked against the area before a byte is read. A malformed request gets
an error frame on a channel that stays open (a frame in shared memory is always whole).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import MessageError, MisuseError
from agent.logs import log_event
from agent.serving import batch_run, wire
from agent.serving.api import InferenceService, error_body
from agent.serving.shm_layout import (
    RING_DONE,
    W_CLIENT_PARKED,
    W_REP,
    W_REQ,
    W_SERVER_PARKED,
    Fence,
    Geometry,
    control_words,
    write_parts,
)

_log = logging.getLogger("edgefleet.inference_api.shm")
_SWEEP_NS = 1_000_000_000  # idle channels
_POLL_NS = 10_000_000  # closed peers and stale rings, even while spinning


@dataclass(frozen=True)
class ShmConfig:
    """The shared-memory channel of a Unix server (offered where `shm_layout.supported()`)."""

    spin_us: float = 300.0  # keep polling this long after the last request before sleeping
    stack: bool = False  # run requests of several channels ready at once as one batch
    max_rows: int = 64  # rows of one stacked run
    # Serve clients of this very process too (tests; a client there must not spin: shm_spin_us=0).
    same_process: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.spin_us <= 100_000 or self.max_rows < 1:
            raise MisuseError("shm: spin_us must be in [0, 100000] and max_rows >= 1")


_KnownReply = tuple[dict[str, str], tuple[tuple[str, np.ndarray], ...], int, int, int]


class _Channel:
    __slots__ = ("arrays", "ctl", "geo", "known", "last", "private", "region", "release", "rep",
                 "reply_known", "req", "seen", "sock")

    def __init__(self, sock: socket.socket, region: mmap.mmap, geo: Geometry,
                 release: Callable[[], None]) -> None:
        self.sock, self.region, self.geo, self.release = sock, region, geo, release
        self.ctl = control_words(region)
        whole = memoryview(region)
        self.req = whole[geo.req_offset:geo.req_offset + geo.req_size]
        self.rep = whole[geo.rep_offset:geo.rep_offset + geo.rep_size]
        whole.release()
        self.private = bytearray(4096)  # the request's payload, copied out of shared memory
        self.seen = 0
        self.last = time.monotonic_ns()
        # The last request's header and descriptors (bytes), its layout, payload offset and size.
        self.known: tuple[bytes, wire.Layout, int, int] | None = None
        # The input arrays of that layout over `private`, their rows checked against the limits
        # when they were built (the same objects for every request: building views per
        # request cost more than the copy into them).
        self.arrays: dict[str, np.ndarray] | None = None
        # The last reply written whole: its model, per output its name and an array over the
        # reply area where its tensor goes (of the tensor's dtype and shape), and where its
        # prediction ids' first id is in the area, that id's length and the ids' count (0, 0, 0
        # without ids): a reply of the same layout rewrites only that id and the tensors.
        self.reply_known: _KnownReply | None = None


class ShmPoller:
    """Serves every adopted channel on one thread until `stop()` (see the module docstring)."""

    def __init__(self, service: InferenceService, config: ShmConfig, templates: wire.ReplyTemplates) -> None:
        self.service = service
        self.limits = service.limits
        self.config = config
        self.templates = templates
        self.requests = self.stacked_runs = 0  # counters, for tests and benchmarks
        self._channels: list[_Channel] = []
        self._incoming: list[_Channel] = []
        self._lock = threading.Lock()
        self._fence = Fence()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> ShmPoller:
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="inference-shm-poller", daemon=True)
        self._thread.start()
        return self

    def adopt(
        self, sock: socket.socket, region: mmap.mmap, geo: Geometry, release: Callable[[], None]
    ) -> None:
        """Take over a connection whose client was sent the region: from now on its socket is
        only the doorbell. `release` is called once the channel is closed."""
        ch = _Channel(sock, region, geo, release)
        with self._lock:
            self._incoming.append(ch)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def stop(self) -> None:
        """Close every channel and end the thread (waits up to 5 s)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def channels(self) -> int:
        return len(self._channels) + len(self._incoming)

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        clock = time.perf_counter_ns
        spin_ns = int(self.config.spin_us * 1000)
        last = next_sweep = next_poll = clock()
        try:
            while not self._stopping:
                if self._incoming:
                    self._take_incoming()
                ready = [ch for ch in self._channels if ch.ctl[W_REQ] != ch.seen]
                now = clock()
                if ready:
                    self._serve(ready)
                    last = now
                elif now - last >= spin_ns or not self._channels:
                    self._park()
                    last = clock()
                else:  # spinning: a client woken on this CPU gets it at once (and the GIL)
                    os.sched_yield()
                if now >= next_poll:  # even while busy: closed peers free their slots soon
                    self._poll(0)
                    next_poll = now + _POLL_NS
                    if now >= next_sweep:
                        self._sweep()
                        next_sweep = now + _SWEEP_NS
        finally:
            for ch in self._channels + self._incoming:
                self._close(ch)
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_incoming(self) -> None:
        with self._lock:
            new, self._incoming = self._incoming, []
        for ch in new:
            self._channels.append(ch)
            self._sel.register(ch.sock, selectors.EVENT_READ, ch)

    def _park(self) -> None:
        """Mark every channel parked, re-check (Dekker), then sleep until something happens."""
        for ch in self._channels:
            ch.ctl[W_SERVER_PARKED] = 1
        self._fence()
        if not any(ch.ctl[W_REQ] != ch.seen for ch in self._channels):
            self._poll(1.0)
        for ch in self._channels:
            ch.ctl[W_SERVER_PARKED] = 0

    def _poll(self, timeout: float) -> None:
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
                continue
            ch: _Channel = key.data
            try:
                rang = ch.sock.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                rang = b""
            if not rang:  # the client closed its end
                self._close(ch)

    def _sweep(self) -> None:
        limit = int(self.limits.idle_timeout_s * 1e9)
        now = time.monotonic_ns()
        for ch in list(self._channels):
            if now - ch.last > limit:
                log_event(_log, "inference.shm.idle_closed", idle_s=self.limits.idle_timeout_s)
                self._close(ch)

    def _close(self, ch: _Channel) -> None:
        ch.ctl[W_SERVER_PARKED] = 1  # a client about to write rings, and finds the socket closed
        ch.reply_known = ch.arrays = None  # their arrays export the views released below
        if ch in self._channels:
            self._channels.remove(ch)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(ch.sock)
        with contextlib.suppress(OSError):
            ch.sock.shutdown(socket.SHUT_RDWR)
        ch.sock.close()
        for view in (ch.ctl, ch.req, ch.rep):
            view.release()
        ch.region.close()
        ch.release()

    # -- serving --------------------------------------------------------------------------
    def _serve(self, ready: list[_Channel]) -> None:
        self.requests += len(ready)
        now = time.monotonic_ns()
        if len(ready) == 1 or not self.config.stack:  # each on its own, answered as soon as done
            for ch in ready:
                seq = ch.ctl[W_REQ]
                self._answer(ch)
                self._publish(ch, seq, now)
            return
        seqs = [ch.ctl[W_REQ] for ch in ready]
        taken: list[batch_run.Request] = []
        for ch in ready:
            try:
                taken.append(batch_run.Request(ch, self._take(ch)))
            except Exception as exc:
                self._write(ch, _error_parts(exc))
        replies, runs, _ = batch_run.run(self.service, taken, self.config.max_rows, self.templates)
        self.stacked_runs += runs
        for owner, parts, _total in replies:
            self._write(owner, parts)
        for ch, seq in zip(ready, seqs, strict=True):
            self._publish(ch, seq, now)

    def _publish(self, ch: _Channel, seq: int, now: int) -> None:
        """Tell the client its reply (written) is there, ringing if it may be asleep (Dekker)."""
        ch.seen = seq
        ch.last = now
        ch.ctl[W_REP] = seq
        self._fence()
        if ch.ctl[W_CLIENT_PARKED]:
            try:
                ch.sock.send(RING_DONE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass  # the client has rings it has not read: it wakes anyway
            except OSError:
                self._close(ch)

    def _answer(self, ch: _Channel) -> None:
        """Run the channel's request and write its reply (outputs, or an error frame)."""
        try:
            service = self.service
            outputs, model, ids = service.run_on(service.target(), self._take(ch))  # rows: checked by _take
            first, count = (ids[0], len(ids)) if ids else ("", 0)
            if self._fast_reply(ch, model, outputs, first, count):
                return
            parts = self.templates.parts(outputs, model["name"], model["version"], first, count)[0]
        except Exception as exc:
            self._write(ch, _error_parts(exc))
            return
        if self._write(ch, parts):  # parts: header, name + version, first id, descriptors, tensors
            id_at = memoryview(parts[0]).nbytes + memoryview(parts[1]).nbytes
            at = sum(memoryview(p).nbytes for p in parts[:len(parts) - len(outputs)])
            outs = []
            for k, a in outputs.items():
                outs.append((k, np.frombuffer(ch.rep, a.dtype, a.size, at).reshape(a.shape)))
                at += a.nbytes
            ch.reply_known = (dict(model), tuple(outs), id_at, len(parts[2]), count)

    @staticmethod
    def _fast_reply(ch: _Channel, model: dict[str, str], outputs: dict[str, np.ndarray],
                    first: str, count: int) -> bool:
        """Write only the first prediction id and the tensors when the model, the output
        layout, the ids' count and the first id's length are those of the channel's last reply
        written whole: everything else is still there. False otherwise (tensors may be half
        written: the caller then writes the whole reply, and the client reads nothing before
        the reply's sequence word)."""
        known = ch.reply_known
        if known is None or known[0] != model or len(outputs) != len(known[1]) or known[4] != count:
            return False
        raw = first.encode()
        if len(raw) != known[3]:
            return False
        for (name, dst), (key, arr) in zip(known[1], outputs.items(), strict=True):
            if key != name or arr.dtype != dst.dtype or arr.shape != dst.shape:
                return False
            dst[...] = arr
        if raw:
            ch.rep[known[2]:known[2] + len(raw)] = raw
        return True

    def _take(self, ch: _Channel) -> dict[str, np.ndarray]:
        """The channel's request, copied out of shared memory and checked (header, descriptors,
        and the rows against the service's batch limit), as input arrays.

        Raises `MessageError` / `RequestTooLargeError` (answered with an error frame).
        """
        known = ch.known
        if known is not None and ch.req[:len(known[0])] == known[0]:  # the layout of last time
            _, layout, at, payload_len = known
            arrays = ch.arrays
        else:
            ch.arrays = arrays = None
            layout, at, payload_len = self._parse_head(ch)
        if len(ch.private) < payload_len:  # replaced, not resized: old views may still export it
            ch.private = bytearray(max(payload_len, 2 * len(ch.private)))
            ch.arrays = arrays = None
        ch.private[:payload_len] = ch.req[at:at + payload_len]
        if arrays is None:
            arrays = wire.views(layout, ch.private)
            self.service.check_rows(arrays)  # once per layout: the shapes are the layout's
            ch.arrays = arrays
        return dict(arrays)  # the arrays are the channel's; the dict is the caller's

    def _parse_head(self, ch: _Channel) -> tuple[wire.Layout, int, int]:
        """Check the request's header and descriptors (remembered for the next request).

        Raises `MessageError` / `RequestTooLargeError`.
        """
        head = bytes(ch.req[:wire.HEADER.size])
        if head[:4] != wire.MAGIC:
            raise MessageError("the shared-memory request area does not hold an EFB1 frame")
        n_arrays, desc_len, payload_len = wire.check_request(
            head, 0, self.limits.max_header_bytes, self.limits.max_body_bytes
        )
        at = wire.HEADER.size + desc_len
        if at + payload_len > len(ch.req):
            raise MessageError(
                f"request frame of {at + payload_len} bytes overruns the {len(ch.req)}-byte area"
            )
        layout, need = wire.parse_desc(bytes(ch.req[wire.HEADER.size:at]), n_arrays)
        if need != payload_len:
            raise MessageError(f"payload is {payload_len} bytes, the descriptors need {need}")
        ch.known = (bytes(ch.req[:at]), layout, at, payload_len)
        return layout, at, payload_len

    def _write(self, ch: _Channel, parts: list[Any]) -> bool:
        """Write a whole reply (False: it did not fit, an error frame went instead). The
        channel's remembered reply layout is forgotten: its bytes are overwritten."""
        ch.reply_known = None
        try:
            write_parts(ch.rep, parts)
        except MessageError as exc:
            write_parts(ch.rep, [wire.error_frame(413, "too_large", str(exc), False)])
            return False
        return True


def _error_parts(exc: BaseException) -> list[Any]:
    status, doc = error_body(exc)
    return [wire.error_frame(status, doc["error"]["code"], doc["error"]["message"], False)]
