"""The shared-memory channel of the Unix-socket API ("EFS1"): its layout and the rules both ends follow.

Why a second transport beside the socket: at batch 1 a socket round trip costs two system
calls and a thread wake-up on each side, more than the model (see "Where the time goes" in
docs/inference-api.md). Over a shared memory region the client writes its EFB1 request
frame, bumps a sequence word, and spins on the reply's word for a few hundred microseconds;
the server's poller spins on the request words of all its channels while requests keep
coming. A round trip with both ends awake is two cache-line transfers and the model.

The socket stays: the client opens the channel on its connection (an EFI1 `shm_open` frame;
the reply carries a `memfd` by `SCM_RIGHTS`, so the region is private to that connection and
inherits the socket's file permissions), and the same connection is then the doorbell for a
side that stopped spinning and sleeps in `recv`. Frames are the EFB1 ones
(`agent.serving.wire`), unchanged, so the decoding and its checks are the socket path's.

Layout of the region (native little-endian u64 words in the first page; areas page-aligned):

    word 0  magic "EFS1" + layout version (u32 1), written by the server
    word 1  REQ: sequence of the last request the client wrote (client writes)
    word 2  REP: sequence of the last request answered (server writes)
    word 3  SERVER_PARKED: 1 while the server may be asleep in `recv` (then ring: send b"R")
    word 4  CLIENT_PARKED: 1 while the client may be asleep in `recv` (then ring: send b"D")
    [req_offset, +req_size)  the request frame (EFB1 kind 1), written by the client
    [rep_offset, +rep_size)  the reply frame (EFB1 kind 2 or 3), written by the server

Ordering: a side writes its frame, then its sequence word; the other reads the word, then
the frame. Parking is Dekker's handshake: "set my PARKED, fence, re-check the peer's word"
against "set my word, fence, read the peer's PARKED", so a wake-up is never lost. `fence()`
is an uncontended lock round trip (a locked instruction: a full barrier on x86-64, where
total store order also keeps frame-before-word). Python gives no such guarantee on weakly
ordered CPUs, so the server offers the channel on x86-64 only (`supported()`); elsewhere the
client stays on the socket. A C client uses C11 atomics (release store of its word,
acquire load of the peer's, `atomic_thread_fence(memory_order_seq_cst)` in the handshake).
"""

from __future__ import annotations

import os
import platform
import threading
from dataclasses import dataclass
from typing import Any

from agent.errors import MessageError

MAGIC_WORD = int.from_bytes(b"EFS1", "little") | (1 << 32)
W_MAGIC, W_REQ, W_REP, W_SERVER_PARKED, W_CLIENT_PARKED = 0, 1, 2, 3, 4
CONTROL_BYTES = 4096
PAGE = 4096
RING_REQUEST, RING_DONE = b"R", b"D"
#: Area sizes a client asks for unless it says otherwise, and the bounds the server holds.
DEFAULT_AREA_BYTES = 1 << 20
MIN_AREA_BYTES = PAGE


def supported() -> bool:
    """Whether this process may serve or use the channel: Linux `memfd_create` on x86-64."""
    return hasattr(os, "memfd_create") and platform.machine().lower() in {"x86_64", "amd64"}


def _pages(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


@dataclass(frozen=True)
class Geometry:
    """Where the areas are in one channel's region (sent to the client in the open reply)."""

    req_offset: int
    req_size: int
    rep_offset: int
    rep_size: int

    @property
    def size(self) -> int:
        return self.rep_offset + self.rep_size

    @classmethod
    def for_request(cls, request_bytes: Any, reply_bytes: Any, max_area: int) -> Geometry:
        """The geometry for a client's `shm_open` (sizes rounded up to pages, capped at `max_area`).

        Raises `MessageError` for sizes that are not positive integers.
        """
        sizes = []
        for label, value in (("request_bytes", request_bytes), ("reply_bytes", reply_bytes)):
            if value is None:
                value = DEFAULT_AREA_BYTES
            if type(value) is not int or value < 1:
                raise MessageError(f"shm_open: {label} must be a positive integer, got {value!r}")
            sizes.append(_pages(min(max(value, MIN_AREA_BYTES), max_area)))
        req, rep = sizes
        return cls(CONTROL_BYTES, req, CONTROL_BYTES + req, rep)

    def to_doc(self) -> dict[str, int]:
        return {"version": 1, "size": self.size, "req_offset": self.req_offset, "req_size": self.req_size,
                "rep_offset": self.rep_offset, "rep_size": self.rep_size}

    @classmethod
    def from_doc(cls, doc: Any, region_size: int) -> Geometry:
        """The server's geometry, checked against the region actually mapped.

        Raises `MessageError` when the document is malformed or points outside the region.
        """
        try:
            if doc["version"] != 1:
                raise MessageError(f"shared-memory layout version {doc['version']!r} is not 1")
            geo = cls(int(doc["req_offset"]), int(doc["req_size"]), int(doc["rep_offset"]),
                      int(doc["rep_size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"malformed shm_open reply: {exc}") from exc
        if (geo.req_offset < CONTROL_BYTES or geo.req_size < 1
                or geo.rep_offset < geo.req_offset + geo.req_size or geo.rep_size < 1
                or geo.size > region_size):
            raise MessageError("shm_open reply: areas overlap or lie outside the region")
        return geo


class Fence:
    """A full memory barrier for the parking handshake: an uncontended lock round trip.

    One per thread that uses it (a shared one would work, only slower under contention).
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self) -> None:
        self._lock.acquire()
        self._lock.release()


def control_words(region: Any) -> memoryview:
    """The control page's u64 words as a writable view (`region`: an mmap)."""
    return memoryview(region)[:CONTROL_BYTES].cast("Q")


def write_parts(area: memoryview, parts: list[Any]) -> int:
    """Copy `sendmsg`-style parts back to back into `area`; returns the bytes written.

    Raises `MessageError` when they do not fit (the caller answers with an error frame).
    """
    at = 0
    for p in parts:
        mv = p if isinstance(p, memoryview) else memoryview(p)
        n = mv.nbytes
        if at + n > len(area):
            raise MessageError(f"reply of more than {len(area)} bytes does not fit the shared-memory area")
        area[at:at + n] = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        at += n
    return at

