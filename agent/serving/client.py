"""Python clients for the local inference API (Unix socket and HTTP), used by apps, tests and benchmarks.

Both keep one persistent connection and turn error replies back into the agent's error
classes, so `except InputValidationError` works the same in-process and over either transport.
Neither is thread-safe: use one client per thread.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
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
from agent.serving.api import FRAME, ApiLimits, decode_frame_body, encode_frame, parse_prefix


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


class UnixInferenceClient:
    """Client for the framed Unix-socket API. Transport failures raise `TransportError`."""

    def __init__(self, path: Path | str, timeout: float = 10.0, limits: ApiLimits | None = None) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.limits = limits or ApiLimits(max_body_bytes=1 << 30, max_header_bytes=1 << 24)
        self._sock: socket.socket | None = None
        self._stream: Any = None
        self.last_model: dict[str, Any] = {}
        self.last_prediction_ids: list[str] = []

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot connect to {self.path}: {exc}") from exc
        self._sock, self._stream = sock, sock.makefile("rb", buffering=64 * 1024)

    def _read(self, n: int) -> bytes:
        data = self._stream.read(n) if n else b""
        if len(data) != n:
            self.close()
            raise TransportError("the server closed the connection mid-reply")
        return bytes(data)

    def call(
        self, header: dict[str, Any], arrays: Mapping[str, np.ndarray] | None = None, cache_key: Any = None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send one frame and return the reply's header and arrays; error replies raise."""
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        try:
            # The server may have answered (busy, too large) and closed: read its reply anyway.
            with contextlib.suppress(OSError):
                self._sock.sendall(encode_frame(header, arrays, cache_key))
            head_len, payload_len = parse_prefix(self._read(FRAME.size), self.limits)
            reply, out = decode_frame_body(self._read(head_len), self._read(payload_len))
        except OSError as exc:
            self.close()
            raise TransportError(f"inference socket failed: {exc}") from exc
        if reply.get("close"):
            self.close()
        status = int(reply.get("status", 500))
        if status >= 300:
            raise_for_error(status, reply)
        return reply, out

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Outputs by name for `inputs` (arrays or nested lists, batch on axis 0)."""
        arrays = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in inputs.items()}
        reply, out = self.call({"op": "predict"}, arrays, cache_key="predict")
        self.last_model = reply.get("model", {})
        self.last_prediction_ids = list(reply.get("prediction_ids") or [])
        return out

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
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._stream = None

    def __enter__(self) -> UnixInferenceClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class HttpInferenceClient:
    """Client for the HTTP API on one keep-alive connection. Transport failures raise `TransportError`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._conn: http.client.HTTPConnection | None = None
        self.last_model: dict[str, Any] = {}
        self.last_prediction_ids: list[str] = []

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> tuple[int, dict[str, str], bytes]:
        """One raw request; returns status, lower-cased headers and body. Raises `TransportError`."""
        for attempt in (0, 1):  # one retry when a kept-alive connection was closed by the server
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self._conn.connect()
                assert self._conn.sock is not None
                self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            headers = {"Content-Type": content_type} if body is not None else {}
            try:
                self._conn.request(method, path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt:
                    raise TransportError(f"HTTP connection failed: {exc}") from exc
                continue
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise TransportError(f"HTTP request failed: {exc}") from exc
            if resp.will_close:
                self.close()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        status, _, data = self.request(method, path, body)
        doc = json.loads(data) if data else {}
        raise_for_error(status, doc)
        return dict(doc)

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Outputs by name, sent as JSON (`{"inputs": ...}`)."""
        body = json.dumps({"inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}).encode()
        doc = self._json("POST", "/v1/predict", body)
        self.last_model = doc.get("model", {})
        self.last_prediction_ids = list(doc.get("prediction_ids") or [])
        return {k: np.asarray(v) for k, v in doc["outputs"].items()}

    def feedback(self, labels: Mapping[str, Any]) -> dict[str, int]:
        """Send labels for earlier predictions (`{prediction_id: label}`); returns the counts."""
        body = json.dumps({"labels": [{"prediction_id": k, "label": v} for k, v in labels.items()]})
        return dict(self._json("POST", "/v1/feedback", body.encode())["feedback"])

    def predict_npy(self, x: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """Send one array as `.npy` (single-input models); returns the output (or a dict for npz)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
        status, headers, data = self.request("POST", "/v1/predict", buf.getvalue(), "application/x-npy")
        if status >= 300:
            raise_for_error(status, json.loads(data) if data else {})
        self.last_model = {
            "name": headers.get("x-model-name", ""),
            "version": headers.get("x-model-version", ""),
        }
        first, count = headers.get("x-prediction-id", ""), int(headers.get("x-prediction-count", "0") or 0)
        epoch, _, n = first.rpartition("-")
        self.last_prediction_ids = [f"{epoch}-{int(n) + i}" for i in range(count)] if n.isdigit() else []
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        return {k: loaded[k] for k in loaded.files}

    def info(self) -> dict[str, Any]:
        """The served model's info."""
        return self._json("GET", "/v1/model")

    def health(self) -> dict[str, Any]:
        """Liveness and readiness."""
        return self._json("GET", "/v1/health")

    def close(self) -> None:
        """Close the connection (the next call reconnects)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> HttpInferenceClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
