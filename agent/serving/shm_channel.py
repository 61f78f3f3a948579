"""One shared-memory channel as the server sees it: its areas, and reading a request from it
and writing a reply into it (the poller, `agent.serving.shm_server`, decides when).

Why apart from the poller: the poller is about time (spin, park, sweep, stack what is ready);
this is about bytes, and the rules that keep them safe and cheap:

- the region is shared with the client, which may rewrite it at any moment, so a request is
  copied out (header, descriptors, payload) before it is checked and run, and every length
  is checked against the area before a byte is read;
- a request of the last request's layout (the header and descriptors byte for byte) reuses
  that layout's input arrays over the private copy, already checked against the row limit;
- a reply of the last reply's layout (model, outputs, ids' count and first id's length)
  rewrites only its first prediction id and its tensors: everything else is still there;
- a reply that does not fit becomes an error frame; a frame in shared memory is always whole.
"""

from __future__ import annotations

import mmap
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.errors import MessageError
from agent.serving import wire
from agent.serving.api import InferenceService
from agent.serving.shm_layout import Geometry, control_words, write_parts

_KnownReply = tuple[dict[str, str], tuple[tuple[str, np.ndarray], ...], int, int, int]


class ShmChannel:
    """A channel's socket (its doorbell), region, areas and what is remembered of its last
    request and reply."""

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

    # -- the request ----------------------------------------------------------------------
    def take(self, service: InferenceService) -> dict[str, np.ndarray]:
        """The channel's request, copied out of shared memory and checked (header, descriptors,
        and the rows against the service's batch limit), as input arrays.

        Raises `MessageError` / `RequestTooLargeError` (answered with an error frame).
        """
        known = self.known
        if known is not None and self.req[:len(known[0])] == known[0]:  # the layout of last time
            _, layout, at, payload_len = known
            arrays = self.arrays
        else:
            self.arrays = arrays = None
            layout, at, payload_len = self._parse_head(service.limits.max_header_bytes,
                                                       service.limits.max_body_bytes)
        if len(self.private) < payload_len:  # replaced, not resized: old views may still export it
            self.private = bytearray(max(payload_len, 2 * len(self.private)))
            self.arrays = arrays = None
        self.private[:payload_len] = self.req[at:at + payload_len]
        if arrays is None:
            arrays = wire.views(layout, self.private)
            service.check_rows(arrays)  # once per layout: the shapes are the layout's
            self.arrays = arrays
        return dict(arrays)  # the arrays are the channel's; the dict is the caller's

    def _parse_head(self, max_header: int, max_body: int) -> tuple[wire.Layout, int, int]:
        """Check the request's header and descriptors (remembered for the next request).

        Raises `MessageError` / `RequestTooLargeError`.
        """
        head = bytes(self.req[:wire.HEADER.size])
        if head[:4] != wire.MAGIC:
            raise MessageError("the shared-memory request area does not hold an EFB1 frame")
        n_arrays, desc_len, payload_len = wire.check_request(head, 0, max_header, max_body)
        at = wire.HEADER.size + desc_len
        if at + payload_len > len(self.req):
            raise MessageError(
                f"request frame of {at + payload_len} bytes overruns the {len(self.req)}-byte area"
            )
        layout, need = wire.parse_desc(bytes(self.req[wire.HEADER.size:at]), n_arrays)
        if need != payload_len:
            raise MessageError(f"payload is {payload_len} bytes, the descriptors need {need}")
        self.known = (bytes(self.req[:at]), layout, at, payload_len)
        return layout, at, payload_len

    # -- the reply ------------------------------------------------------------------------
    def reply(self, outputs: dict[str, np.ndarray], model: dict[str, str], first: str, count: int,
              templates: wire.ReplyTemplates) -> None:
        """Write a predict reply: only the first id and the tensors when its layout is the last
        reply's, else whole (and remembered). Raises `MessageError` for an output dtype the wire
        does not carry (the caller writes an error frame instead)."""
        if self._fast_reply(model, outputs, first, count):
            return
        parts = templates.parts(outputs, model["name"], model["version"], first, count)[0]
        if self.write(parts):  # parts: header, name + version, first id, descriptors, tensors
            id_at = memoryview(parts[0]).nbytes + memoryview(parts[1]).nbytes
            at = sum(memoryview(p).nbytes for p in parts[:len(parts) - len(outputs)])
            outs = []
            for k, a in outputs.items():
                outs.append((k, np.frombuffer(self.rep, a.dtype, a.size, at).reshape(a.shape)))
                at += a.nbytes
            self.reply_known = (dict(model), tuple(outs), id_at, len(parts[2]), count)

    def _fast_reply(self, model: dict[str, str], outputs: dict[str, np.ndarray],
                    first: str, count: int) -> bool:
        """Write only the first prediction id and the tensors when the model, the output
        layout, the ids' count and the first id's length are those of the channel's last reply
        written whole. False otherwise (tensors may be half written: the caller then writes
        the whole reply, and the client reads nothing before the reply's sequence word)."""
        known = self.reply_known
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
            self.rep[known[2]:known[2] + len(raw)] = raw
        return True

    def write_error(self, exc: BaseException) -> None:
        """Answer with the error frame `exc` maps to (status, code, message)."""
        self.write([wire.error_frame_of(exc)])

    def write(self, parts: list[Any]) -> bool:
        """Write a whole reply (False: it did not fit, an error frame went instead). The
        remembered reply layout is forgotten: its bytes are overwritten."""
        self.reply_known = None
        try:
            write_parts(self.rep, parts)
        except MessageError as exc:
            write_parts(self.rep, [wire.error_frame(413, "too_large", str(exc), False)])
            return False
        return True

    def close(self) -> None:
        """Release the views and the region (the socket is the poller's to close first)."""
        self.reply_known = self.arrays = None  # their arrays export the views released below
        for view in (self.ctl, self.req, self.rep):
            view.release()
        self.region.close()
