"""What a Unix server needs to offer shared-memory channels (EFS1): answering `shm_open`.

Kept apart from the poller (`agent.serving.shm_server`) because both servers use it, the
thread-per-connection one and the micro-batching loop: each hands a connection that asked
for a channel to `ShmOffer.open`, which creates the region (`memfd`), sends its descriptor
with the reply (`SCM_RIGHTS`), and gives the connection to the poller as the channel's doorbell.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from agent.errors import MessageError
from agent.logs import log_event
from agent.serving import wire
from agent.serving.api import InferenceService
from agent.serving.efi1 import encode_frame
from agent.serving.shm_layout import MAGIC_WORD, W_MAGIC, Geometry, control_words
from agent.serving.shm_server import ShmConfig, ShmPoller

_log = logging.getLogger("edgefleet.inference_api.shm")


def create_region(geo: Geometry) -> tuple[int, mmap.mmap]:
    """A fresh anonymous region (`memfd`) of the geometry's size, its magic word written.

    Returns the fd (to send to the client, then close) and the server's mapping.
    """
    fd = os.memfd_create("edgefleet-efs1", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, geo.size)
        region = mmap.mmap(fd, geo.size)
    except OSError:
        os.close(fd)
        raise
    ctl = control_words(region)
    ctl[W_MAGIC] = MAGIC_WORD
    ctl.release()
    return fd, region


class ShmOffer:
    """What a Unix server needs to offer the channel: answering `shm_open` and the poller."""

    def __init__(self, service: InferenceService, config: ShmConfig, templates: wire.ReplyTemplates) -> None:
        self.config = config
        self.limits = service.limits
        self.poller = ShmPoller(service, config, templates)

    def geometry(self, header: dict[str, Any], sock: socket.socket) -> Geometry:
        """The areas for an `shm_open` request. Raises `MessageError` for bad sizes, and for a
        client in this very process: its thread and the poller would spin against each other
        for the GIL, so it stays on the socket (which serves it without a thread hop)."""
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[0] == os.getpid() and not self.config.same_process:
            raise MessageError("shared memory is for clients in other processes; stay on the socket")
        most = self.limits.max_body_bytes + self.limits.max_header_bytes + wire.HEADER.size
        return Geometry.for_request(header.get("request_bytes"), header.get("reply_bytes"), most)

    def open(self, sock: socket.socket, geo: Geometry, release: Callable[[], None]) -> None:
        """Create the region, send the reply with its fd, and hand the connection to the poller.

        The connection is closed (and `release` called) when that fails.
        """
        try:
            fd, region = create_region(geo)
        except OSError as exc:
            log_event(_log, "inference.shm.open_failed", logging.WARNING, error=str(exc))
            with contextlib.suppress(OSError):
                sock.sendall(encode_frame({"status": 503, "error": {
                    "code": "shm_unavailable", "message": f"no shared memory: {exc}"}}))
            sock.close()
            release()
            return
        try:
            socket.send_fds(sock, [encode_frame({"status": 200, "shm": geo.to_doc()})], [fd])
        except OSError:
            region.close()
            sock.close()
            release()
            return
        finally:
            os.close(fd)
        self.poller.adopt(sock, region, geo, release)
