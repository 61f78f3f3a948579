"""Python clients for the local inference API (HTTP here; the Unix socket one is `agent.inference_client`).

Both keep one persistent connection and turn error replies back into the agent's error
classes, so `except InputValidationError` works the same in-process and over either transport.
Neither is thread-safe: use one client per thread.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import numpy as np

from agent.errors import TransportError
from agent.inference_client import InferenceClient
from agent.serving.wire import raise_for_error

__all__ = ["HttpInferenceClient", "UnixInferenceClient", "raise_for_error"]


#: The Unix-socket client lives in `agent.inference_client` (binary EFB1 predict frames); this
#: name stays for existing imports.
UnixInferenceClient = InferenceClient


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
