"""The inference API over a Unix domain socket: binary EFB1 predict frames and JSON-headed EFI1 ones.

Why not HTTP here: parsing HTTP in pure Python costs more than the whole request. Predict
requests use the fixed binary header of `agent.serving.wire` (cached descriptors, tensors
viewed in the receive buffer, reply sent with one `sendmsg`); EFI1 (`agent.serving.efi1`)
carries the JSON operations and older clients. One thread per connection (bounded) runs the
request itself, so a persistent client's round trip is one `recv_into` wake-up and one
`sendmsg` on each side, with no queue or thread hop in between. With `batching` set, one
event-loop thread serves every connection instead and runs concurrent requests as one batch
(`agent.serving.batch_loop`; off by default). Where the machine allows it
(`shm_layout.supported()`), a client may turn its connection into a shared-memory channel
(EFI1 `shm_open`, `agent.serving.shm_server`): the fast path for a local application, with
the socket kept as its doorbell and as the fallback everywhere else.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import stat
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from agent.errors import MessageError, MisuseError
from agent.logs import log_event
from agent.serving import wire
from agent.serving.api import SLOT_WAIT_S, ApiLimits, FeedbackSink, InferenceService, Predictor, error_body
from agent.serving.batch_loop import BatchLoop
from agent.serving.batch_run import BatchConfig
from agent.serving.efi1 import FRAME, decode_frame_body, encode_frame, parse_prefix
from agent.serving.shm_layout import supported as shm_supported
from agent.serving.shm_offer import ShmOffer
from agent.serving.shm_server import ShmConfig
from agent.serving.wire import FrameReader, set_kernel_timeouts

_log = logging.getLogger("edgefleet.inference_api.unix")
#: `_handle_one`'s answer when the connection became a shared-memory channel (not closed here).
_HANDED_OVER = object()
#: Shared memory is offered by default (where the machine allows it); `shm=None` turns it off.
DEFAULT_SHM = ShmConfig()


class UnixInferenceServer:
    """Serves a `Predictor` on a Unix socket path (mode 0660) until `stop()`."""

    def __init__(
        self, predictor: Predictor, path: Path, limits: ApiLimits | None = None,
        feedback: FeedbackSink | None = None, batching: BatchConfig | None = None,
        shm: ShmConfig | None = DEFAULT_SHM,
    ) -> None:
        self.service = InferenceService(predictor, limits, feedback)
        self.batching = batching
        self._replies = wire.ReplyTemplates()
        if shm is not None and batching is not None:  # stack channels' requests as the loop does
            shm = ShmConfig(shm.spin_us, True, batching.max_rows, shm.same_process)
        self.shm = ShmOffer(self.service, shm, self._replies) if shm is not None and shm_supported() else None
        self.loop: BatchLoop | None = None
        self.limits = self.service.limits
        self.path = path
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._stopping = threading.Event()

    def start(self) -> UnixInferenceServer:
        """Bind (replacing a stale socket file, never a regular file) and start accepting.

        Raises `MisuseError` if the path is taken by something that is not a socket.
        """
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise MisuseError(f"{self.path} exists and is not a socket; refusing to replace it")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        self.path.chmod(0o660)
        sock.listen(self.limits.max_connections)
        self._sock = sock
        if self.shm is not None:
            self.shm.poller.start()
        if self.batching is not None:  # one event-loop thread for every connection
            self.loop = BatchLoop(sock, self.service, self.batching, self._dispatch, self._replies, self.shm)
            target, name = self.loop.run, "inference-unix-batch"
        else:
            target, name = self._accept_loop, "inference-unix-accept"
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()
        log_event(_log, "inference.unix.listening", path=str(self.path),
                  batching=self.batching is not None, shm=self.shm is not None)
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection and remove the socket file."""
        self._stopping.set()
        if self.loop is not None:
            self.loop.stop()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._conns_lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.shm is not None:
            self.shm.poller.stop()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> UnixInferenceServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(timeout=SLOT_WAIT_S):
                busy = {"status": 503, "error": {"code": "busy", "message": "too many connections"}}
                with contextlib.suppress(OSError):
                    conn.sendall(encode_frame(busy))
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="inference-unix-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)
        set_kernel_timeouts(conn, self.limits.idle_timeout_s)
        reader = FrameReader(conn)
        kept = True
        try:
            while kept:
                kept = self._handle_one(conn, reader)
                if kept is _HANDED_OVER:  # now a shared-memory channel: the poller closes it
                    with self._conns_lock:
                        self._conns.discard(conn)
                    return
        except OSError:
            return
        finally:
            if kept is not _HANDED_OVER:
                conn.close()
                with self._conns_lock:
                    self._conns.discard(conn)
                self._slots.release()

    def _handle_one(self, conn: socket.socket, rd: FrameReader) -> Any:
        """Serve one frame (EFB1 binary predict or EFI1 JSON); False when the connection should
        close, `_HANDED_OVER` when it became a shared-memory channel.

        Runs on the connection's own thread from `recv_into` to `sendmsg`: no queue, no hand-off.
        """
        keep_open, binary = True, False
        try:
            if not rd.fill(4):
                return False
            binary = rd.buf[rd.start:rd.start + 4] == wire.MAGIC
            keep_open = False  # until the frame is fully read, an error leaves the stream unsynced
            if binary:
                return self._binary(conn, rd)
            if not rd.fill(FRAME.size):
                raise MessageError("connection closed mid-frame")
            head_len, payload_len = parse_prefix(bytes(rd.view[rd.start:rd.start + FRAME.size]), self.limits)
            rd.fill(FRAME.size + head_len + payload_len)
            at = rd.take(FRAME.size + head_len + payload_len) + FRAME.size
            head = bytes(rd.view[at:at + head_len])
            payload = bytes(rd.view[at + head_len:at + head_len + payload_len])
            keep_open = True
            header, arrays = decode_frame_body(head, payload)
            if header.get("op") == "shm_open":
                geo = self._shm_geometry(header, rd)
                assert self.shm is not None
                self.shm.open(conn, geo, self._slots.release)
                return _HANDED_OVER
            reply = self._dispatch(header, arrays)
        except OSError:
            raise  # the connection itself failed: nothing to reply to
        except Exception as exc:
            status, doc = error_body(exc)
            if binary:
                reply = wire.error_frame(status, doc["error"]["code"], doc["error"]["message"], not keep_open)
            else:
                if not keep_open:
                    doc["close"] = True  # tells the client this connection is done
                reply = encode_frame({"status": status, **doc})
        conn.sendall(reply)
        return keep_open

    def _binary(self, conn: socket.socket, rd: FrameReader) -> bool:
        """One EFB1 predict frame, from the receive buffer to `sendmsg` of the reply's parts.

        Raises what `_handle_one` maps to error frames; a malformed header is refused before
        the rest of the frame is read (the connection then closes).
        """
        if rd.end - rd.start < wire.HEADER.size and not rd.fill(wire.HEADER.size):
            raise MessageError("connection closed mid-frame")
        n_arrays, desc_len, payload_len = wire.check_request(
            rd.buf, rd.start, self.limits.max_header_bytes, self.limits.max_body_bytes
        )
        total = wire.HEADER.size + desc_len + payload_len
        if rd.end - rd.start < total:
            rd.fill(total)
        at = rd.take(total) + wire.HEADER.size
        # From here the frame was read whole, so the stream is still in sync: errors are
        # answered on a connection that stays open.
        try:
            layout, need = wire.parse_desc(bytes(rd.view[at:at + desc_len]), n_arrays)
            if need != payload_len:
                raise MessageError(f"payload is {payload_len} bytes, the descriptors need {need}")
            outputs, model, ids = self.service.predict_ids(wire.views(layout, rd.buf, at + desc_len))
        except OSError:
            raise
        except Exception as exc:
            conn.sendall(wire.error_frame_of(exc))
            return True
        self._send_reply(conn, outputs, model, ids)
        return True

    def _send_reply(
        self, conn: socket.socket, outputs: dict[str, np.ndarray], model: dict[str, str],
        ids: list[str] | None,
    ) -> None:
        """The reply in one `sendmsg` (`wire.ReplyTemplates`); the rest with `sendall` if the
        socket buffer could not take it at once."""
        parts, total = self._replies.parts(
            outputs, model["name"], model["version"], ids[0] if ids else "", len(ids) if ids else 0
        )
        sent = conn.sendmsg(parts)
        if sent < total:  # a large reply the socket buffer could not take at once
            conn.sendall(b"".join(bytes(p) for p in parts)[sent:])

    def _shm_geometry(self, header: dict[str, Any], rd: FrameReader) -> Any:
        """The channel's areas for `shm_open`. Raises `MessageError` (an EFI1 error reply on a
        connection that stays a socket) when shared memory is not offered here, the sizes are
        bad, or frames were pipelined behind the request."""
        if self.shm is None:
            raise MessageError("this server does not offer shared memory (op shm_open); use the socket")
        if rd.end != rd.start:
            raise MessageError("shm_open must be the last frame the client sent before the reply")
        return self.shm.geometry(header, rd.conn)

    def _dispatch(self, header: dict[str, Any], arrays: dict[str, Any]) -> bytes:
        op = header.get("op", "predict")
        if op == "predict":
            outputs, model, ids = self.service.predict_ids(arrays)
            header = {"status": 200, "model": model}
            extra = {"prediction_ids": ids} if ids is not None else None
            return encode_frame(header, outputs, cache_key=("predict", model["name"], model["version"]),
                                extra=extra)
        if op == "feedback":
            counts = self.service.submit_feedback(header.get("labels"))
            return encode_frame({"status": 200, "feedback": counts})
        if op == "model":
            return encode_frame({"status": 200, "model": self.service.model_info()})
        if op == "health":
            return encode_frame({"status": 200, "health": self.service.health()})
        raise MessageError(f"unknown op {op!r}; expected predict, feedback, model or health")
