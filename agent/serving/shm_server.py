"""The server's end of the shared-memory channels (EFS1): one poller thread for every channel.

Why one thread for all of them: a spinning Python thread holds the GIL, so a thread per
channel would make spinning channels take turns at the interpreter's switch interval
(5 ms). One poller scans every channel's request word, serves what is ready (stacked into
one run when micro-batching is on, `agent.serving.batch_run`), and keeps spinning for
`spin_us` after the last request; then it marks every channel parked and sleeps in
`select` on their sockets (the doorbells, see `agent.serving.shm_layout`) until a client
rings, a channel closes or a new one arrives.

Trust: what is read from a channel and written into it, and the checks that keep that safe
against a client that rewrites the region at any moment, are `agent.serving.shm_channel`'s.
A malformed request gets an error frame on a channel that stays open.

Stacked (micro-batching on): the requests of every channel ready in one pass share one run
where `agent.serving.batch_run` allows, and each reply is written in place (a repeated
layout rewrites only its id and tensors, as for a request served alone) and published at
once. Nothing waits for more requests: a pass stacks only what is already there.
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

from agent.errors import MisuseError
from agent.logs import log_event
from agent.serving import batch_run, wire
from agent.serving.api import InferenceService
from agent.serving.shm_channel import ShmChannel
from agent.serving.shm_layout import (
    RING_DONE,
    W_CLIENT_PARKED,
    W_REP,
    W_REQ,
    W_SERVER_PARKED,
    Fence,
    Geometry,
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


class ShmPoller:
    """Serves every adopted channel on one thread until `stop()` (see the module docstring)."""

    def __init__(self, service: InferenceService, config: ShmConfig, templates: wire.ReplyTemplates) -> None:
        self.service = service
        self.limits = service.limits
        self.config = config
        self.templates = templates
        self.requests = self.stacked_runs = 0  # counters, for tests and benchmarks
        self._channels: list[ShmChannel] = []
        self._incoming: list[ShmChannel] = []
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
        ch = ShmChannel(sock, region, geo, release)
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
            ch: ShmChannel = key.data
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

    def _close(self, ch: ShmChannel) -> None:
        ch.ctl[W_SERVER_PARKED] = 1  # a client about to write rings, and finds the socket closed
        if ch in self._channels:
            self._channels.remove(ch)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(ch.sock)
        with contextlib.suppress(OSError):
            ch.sock.shutdown(socket.SHUT_RDWR)
        ch.sock.close()
        ch.close()
        ch.release()

    # -- serving --------------------------------------------------------------------------
    def _serve(self, ready: list[ShmChannel]) -> None:
        """Answer every ready channel, each published as soon as its reply is written."""
        self.requests += len(ready)
        now = time.monotonic_ns()
        if len(ready) == 1 or not self.config.stack:  # each on its own
            for ch in ready:
                seq = ch.ctl[W_REQ]
                self._answer(ch)
                self._publish(ch, seq, now)
            return
        seqs = {id(ch): ch.ctl[W_REQ] for ch in ready}
        taken: list[batch_run.Request] = []
        for ch in ready:
            try:
                taken.append(batch_run.Request(ch, ch.take(self.service)))
            except Exception as exc:
                ch.write_error(exc)
                self._publish(ch, seqs[id(ch)], now)
        done, runs, _ = batch_run.outcomes(self.service, taken, self.config.max_rows)
        self.stacked_runs += runs
        for o in done:
            ch = o.request.owner
            if o.outputs is None:
                ch.write_error(o.error or RuntimeError("no outputs"))
            else:
                try:
                    ch.reply(o.outputs, o.model, o.first, o.count, self.templates)
                except Exception as exc:
                    ch.write_error(exc)
            self._publish(ch, seqs[id(ch)], now)

    def _publish(self, ch: ShmChannel, seq: int, now: int) -> None:
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

    def _answer(self, ch: ShmChannel) -> None:
        """Run the channel's request and write its reply (outputs, or an error frame)."""
        try:
            service = self.service
            outputs, model, ids = service.run_on(service.target(), ch.take(service))  # rows: checked by take
            first, count = (ids[0], len(ids)) if ids else ("", 0)
            ch.reply(outputs, model, first, count, self.templates)
        except Exception as exc:
            ch.write_error(exc)
