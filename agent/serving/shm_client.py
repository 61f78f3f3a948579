"""The client's end of a shared-memory channel (EFS1, `agent.serving.shm_layout`).

`InferenceClient` opens one on its connection when the server offers it and sends every
predict that fits the request area through it; this module holds only the channel: the
open handshake (`shm_open`, the region's fd by `SCM_RIGHTS`), writing a request, and waiting
for its reply (spin, then park on the socket).

A spinning client calls `sched_yield` between looks, which lets a server thread woken on
the same CPU run at once (without it, the scheduler's habit of waking a peer on the waker's
CPU made both sides spin out their time slices: 150 µs median instead of 45) and lets go of
the GIL. A reply that finds its client spinning needs no ring, so no waiting client sleeps on the
socket while its spin time lasts, and by default every waiting thread spins for itself.
Session 8 measured why nobody may simply sleep: when only a process's first waiter spun and
the others slept in `recv`, the server's rings took over half of the poller's time. With
`one_spinner` (`InferenceClient(shm_one_spinner=True)`) one waiting thread of the process
spins for all such channels and wakes the others when their replies come
(`agent.serving.shm_watch`): sixteen spinners hand the GIL round sixteen ways, and at 16
clients one spinner halves the p99 (4.6 -> 2.4 ms) but costs about a tenth of the rate and,
at one client, 1-2 µs a call (session 10, docs/benchmarks.md), so it is not the default.
`shm_spin_us=0` (the in-process tests do so) never spins.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import time
from collections.abc import Sequence

import numpy as np

from agent.errors import MessageError, TransportError
from agent.serving.efi1 import FRAME, decode_frame_body, encode_frame
from agent.serving.shm_layout import (
    MAGIC_WORD,
    RING_REQUEST,
    W_CLIENT_PARKED,
    W_MAGIC,
    W_REP,
    W_REQ,
    W_SERVER_PARKED,
    Fence,
    Geometry,
    control_words,
)
from agent.serving.shm_watch import WATCH, Waiter
from agent.serving.wire import raise_for_error

#: How long a client spins for its reply before it sleeps in `recv`: longer than a small
#: model's run, short next to a slow one's.
DEFAULT_SHM_SPIN_US = 1000.0


class ShmLink:
    """One open channel over the connected socket `sock` (which is from now on its doorbell)."""

    def __init__(self, sock: socket.socket, region: mmap.mmap, geo: Geometry,
                 one_spinner: bool = False) -> None:
        self.sock, self.region, self.geo = sock, region, geo
        self.ctl = control_words(region)
        whole = memoryview(region)
        self.req = whole[geo.req_offset:geo.req_offset + geo.req_size]
        whole.release()
        self.seq = int(self.ctl[W_REQ])
        self._fence = Fence()
        # The last request's header and descriptors (still in the area: the server never
        # writes there) and an array over the area per input of that layout.
        self._pre = b""
        self._dst: tuple[np.ndarray, ...] = ()
        self._waiter = Waiter(self.ctl) if one_spinner else None

    @property
    def request_room(self) -> int:
        return self.geo.req_size

    @classmethod
    def open(cls, sock: socket.socket, request_bytes: int, reply_bytes: int,
             one_spinner: bool = False) -> ShmLink | None:
        """Ask the server for a channel on `sock` (nothing else in flight on it).

        Returns None when the server declines (the socket then stays a plain connection);
        raises `TransportError` when the reply is broken or the socket fails, and the agent's
        error when it refuses the connection (busy).
        """
        frame = encode_frame({"op": "shm_open", "request_bytes": request_bytes, "reply_bytes": reply_bytes})
        fds: list[int] = []
        try:
            with contextlib.suppress(OSError):  # a busy server answered and closed: read that
                sock.sendall(frame)
            data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
            data = cls._rest_of_frame(sock, data)
            head_len, payload_len = _prefix(data)
            reply, _ = decode_frame_body(data[FRAME.size:FRAME.size + head_len],
                                         data[FRAME.size + head_len:FRAME.size + head_len + payload_len])
            status = int(reply.get("status", 500))
            if status == 400:  # not offered here (an older agent, shared memory off): the socket
                return None
            raise_for_error(status, reply)  # busy, and the like: as the socket's first call would
            if len(fds) != 1:
                raise TransportError("the server accepted shm_open but sent no shared memory")
            size = os.fstat(fds[0]).st_size
            geo = Geometry.from_doc(reply.get("shm"), size)
            region = mmap.mmap(fds[0], size)
        except MessageError as exc:
            raise TransportError(f"malformed shm_open reply: {exc}") from exc
        except OSError as exc:
            raise TransportError(f"shm_open failed: {exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)
        ctl = control_words(region)
        magic = ctl[W_MAGIC]
        ctl.release()
        if magic != MAGIC_WORD:
            region.close()
            raise TransportError("the shared memory the server sent is not an EFS1 region")
        return cls(sock, region, geo, one_spinner)

    @staticmethod
    def _rest_of_frame(sock: socket.socket, data: bytes) -> bytes:
        if not data:
            raise TransportError("the server closed the connection during shm_open")
        while len(data) < FRAME.size or len(data) < FRAME.size + sum(_prefix(data)):
            more = sock.recv(65536)
            if not more:
                raise TransportError("the server closed the connection during shm_open")
            data += more
        return data

    def call(self, pre: bytes, arrays: Sequence[np.ndarray], spin_us: float) -> None:
        """Write one request (`pre`: header and descriptors; then the tensors, C-contiguous and
        of the layout `pre` describes) and wait for its reply (the frame at `geo.rep_offset`
        of `region`). A request of the last request's layout writes only its tensors.

        Raises `TransportError` when the server closed the channel or did not answer within
        the socket's timeout; `MessageError` when the request does not fit the area.
        """
        ctl = self.ctl
        if pre != self._pre:
            self._place(pre, arrays)
        dsts = self._dst
        if len(dsts) != len(arrays):
            raise MessageError(f"{len(arrays)} tensors for a layout of {len(dsts)}")
        if len(dsts) == 1:  # the common case, without a loop
            dsts[0][...] = arrays[0]
        else:
            for i, dst in enumerate(dsts):
                dst[...] = arrays[i]
        self.seq += 1
        seq = self.seq
        ctl[W_REQ] = seq
        self._fence()  # between our word and the server's parked flag (Dekker)
        if ctl[W_SERVER_PARKED]:
            self._ring()
        if ctl[W_REP] != seq:
            self._wait(seq, spin_us)

    def _place(self, pre: bytes, arrays: Sequence[np.ndarray]) -> None:
        """Write `pre` and build the arrays over the area the tensors of its layout go to."""
        self._pre, self._dst = b"", ()  # until all is in place
        at, room = len(pre), self.geo.req_size
        dst = []
        for arr in arrays:
            if at + arr.nbytes > room:
                raise MessageError(f"the request does not fit the channel's {room} bytes")
            dst.append(np.frombuffer(self.region, arr.dtype, arr.size, self.geo.req_offset + at)
                       .reshape(arr.shape))
            at += arr.nbytes
        if at > room:
            raise MessageError(f"the request does not fit the channel's {room} bytes")
        self.req[:len(pre)] = pre
        self._pre, self._dst = pre, tuple(dst)

    def _ring(self) -> None:
        try:
            self.sock.send(RING_REQUEST, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass  # the server has rings it has not read yet: it wakes anyway
        except OSError as exc:
            raise TransportError(f"the shared-memory channel's socket failed: {exc}") from exc

    def _wait(self, seq: int, spin_us: float) -> None:
        ctl = self.ctl
        if spin_us:
            waiter = self._waiter
            if waiter is not None:  # one spinner for the process's clients that asked for it
                if WATCH.wait(waiter, seq, spin_us):
                    return
            else:  # yielding: a server thread woken on this CPU gets it at once
                clock, yield_cpu = time.perf_counter_ns, os.sched_yield
                deadline = clock() + int(spin_us * 1000)
                while ctl[W_REP] != seq:
                    if clock() > deadline:
                        break
                    yield_cpu()
                else:
                    return
        try:
            while True:
                ctl[W_CLIENT_PARKED] = 1
                self._fence()
                if ctl[W_REP] == seq:
                    return
                try:
                    got = self.sock.recv(64)
                except OSError as exc:  # EAGAIN from the kernel timeout, or a failed socket
                    raise TransportError(f"no reply on the shared-memory channel: {exc}") from exc
                if not got:
                    raise TransportError("the agent closed the shared-memory channel")
        finally:
            ctl[W_CLIENT_PARKED] = 0

    def close(self) -> None:
        """Close the channel and its socket."""
        self._pre, self._dst = b"", ()  # their arrays export the region
        with contextlib.suppress(OSError):
            self.sock.close()
        for view in (self.ctl, self.req):
            view.release()
        with contextlib.suppress(BufferError):  # a caller still holds a view: unmapped at exit
            self.region.close()


def _prefix(data: bytes) -> tuple[int, int]:
    """Head and payload lengths of the EFI1 frame at the start of `data`. Raises `MessageError`."""
    if len(data) < FRAME.size:
        return 0, 0
    magic, head_len, payload_len = FRAME.unpack_from(data)
    if magic != b"EFI1":
        raise MessageError("the reply to shm_open is not an EFI1 frame")
    if head_len > 1 << 20 or payload_len > 1 << 20:
        raise MessageError("the reply to shm_open is implausibly large")
    return head_len, payload_len
