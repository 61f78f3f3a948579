"""The inference API over HTTP/1.1 on 127.0.0.1 (stdlib `http.server`, keep-alive, threaded).

Chosen over uvicorn after measuring on the same box: without httptools (not in the agent's
extra) uvicorn parses with h11 in pure Python, and a raw-ASGI no-op echo took 222 µs per
keep-alive round trip against 231 µs for this server's no-op echo, so uvicorn buys nothing
here and would add two dependencies to every device.

Routes: `GET /v1/health`, `GET /v1/model`, `POST /v1/predict` (JSON or `application/x-npy`),
`POST /v1/feedback` (JSON labels for earlier prediction ids), and `GET /metrics` (Prometheus
text: agent/telemetry/exposition.py) when the daemon wires one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from agent.errors import MessageError, RequestTooLargeError
from agent.logs import log_event
from agent.serving.api import SLOT_WAIT_S, ApiLimits, FeedbackSink, InferenceService, Predictor, error_body

_log = logging.getLogger("edgefleet.inference_api.http")
ROUTES = {"/v1/health": "GET", "/v1/model": "GET", "/v1/predict": "POST", "/v1/feedback": "POST",
          "/metrics": "GET"}
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], service: InferenceService) -> None:
        self.service = service
        self.limits = service.limits
        self.slots = threading.BoundedSemaphore(service.limits.max_connections)
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(timeout=SLOT_WAIT_S):
            body = b'{"error":{"code":"busy","message":"too many connections"}}'
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout_s  # type: ignore[misc]
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Per-request access logs would cost more than the request; errors are logged elsewhere."""

    def _send(
        self, status: int, body: bytes, ctype: str = "application/json", headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, doc: dict[str, Any]) -> None:
        self._send(status, json.dumps(doc, separators=(",", ":")).encode())

    def _route(self, method: str) -> str | None:
        path = self.path.split("?", 1)[0]
        if path not in ROUTES:
            self._send_json(404, {"error": {"code": "not_found", "message": f"no route {path}"}})
            return None
        if ROUTES[path] != method:
            self.close_connection = True  # an unread body would desync the stream
            self._send_json(
                405,
                {"error": {"code": "method_not_allowed", "message": f"{path} accepts {ROUTES[path]} only"}},
            )
            return None
        return path

    def do_GET(self) -> None:
        path = self._route("GET")
        if path is None:
            return
        service = self.server.service
        if path == "/metrics":
            if service.metrics is None:
                self._send_json(404, {"error": {"code": "not_found", "message": "no metrics on this server"}})
            else:
                self._send(200, service.metrics(), METRICS_TYPE)
            return
        try:
            doc = service.health() if path == "/v1/health" else service.model_info()
        except Exception as exc:
            status, err = error_body(exc)
            self._send_json(status, err)
            return
        self._send_json(200, doc)

    def do_POST(self) -> None:
        path = self._route("POST")
        if path is None:
            return
        service = self.server.service
        try:
            body = self._read_body(service)
            ctype = (self.headers.get("Content-Type") or "application/json").split(";", 1)[0].strip().lower()
            if path == "/v1/feedback" and ctype == "application/json":
                counts = service.submit_feedback(service.decode_feedback_json(body))
                self._send_json(200, {"feedback": counts})
            elif path == "/v1/feedback":
                raise MessageError(f"Content-Type {ctype!r}: feedback is application/json")
            elif ctype == "application/x-npy":
                arr = service.decode_npy(body)
                outputs, model, ids = service.predict_ids({service.single_input_name(): arr})
                out, out_type = service.encode_npy(outputs)
                headers = {"X-Model-Name": model["name"], "X-Model-Version": model["version"]}
                if ids:  # ids of one batch are consecutive: <epoch>-<n> .. <epoch>-<n + count - 1>
                    headers |= {"X-Prediction-Id": ids[0], "X-Prediction-Count": str(len(ids))}
                self._send(200, out, out_type, headers)
            elif ctype == "application/json":
                outputs, model, ids = service.predict_ids(service.decode_json(body))
                self._send(200, service.encode_json(outputs, model, ids))
            else:
                self._send_json(
                    415,
                    {
                        "error": {
                            "code": "unsupported_media_type",
                            "message": f"Content-Type {ctype!r}: use application/json or application/x-npy",
                        }
                    },
                )
        except Exception as exc:
            status, err = error_body(exc)
            self._send_json(status, err)

    def _read_body(self, service: InferenceService) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise MessageError("chunked bodies are not accepted; send Content-Length")
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise MessageError("a POST needs a valid Content-Length header")
        try:
            service.check_body_size(length)
        except RequestTooLargeError:
            self.close_connection = True  # do not read (or wait for) an oversized body
            raise
        return self.rfile.read(length)


class HttpInferenceServer:
    """Serves a `Predictor` over HTTP on `host:port` (port 0 = pick a free one) until `stop()`."""

    def __init__(
        self, predictor: Predictor, host: str = "127.0.0.1", port: int = 0, limits: ApiLimits | None = None,
        feedback: FeedbackSink | None = None, metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self.service = InferenceService(predictor, limits, feedback, metrics)
        self.host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL such as http://127.0.0.1:8080."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> HttpInferenceServer:
        """Bind and serve in a background thread. Raises `OSError` if the port is taken."""
        self._server = _Server((self.host, self._requested_port), self.service)
        self._server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="inference-http",
            daemon=True,
        )
        self._thread.start()
        log_event(_log, "inference.http.listening", url=self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HttpInferenceServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
