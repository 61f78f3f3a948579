"""The fleet's MQTT publisher: serves repository objects in chunks and publishes desired state.

Library code (no API, no database): the fleet service wraps it. It answers each device's
chunk requests from a TUF repository directory (`metadata/N.root.json`, `timestamp.json`,
`targets/<dir>/<sha256>.<name>`, as written by `fleet/trust/repository.py`), to the response
topic the request names, which must be the requesting device's own (the device id comes
from the topic the ACL ties to its login, never from the payload).

Pacing keeps the broker's memory flat (Mosquitto silently drops QoS 1 messages past
`max_queued_messages`): a token bucket limits bytes/s, each device has at most
`max_pending_per_device` requests queued (beyond that it gets 429 and retries), and the
request queue is bounded (beyond it: 503). The fetcher's own window already bounds what one
device asks for. Several publisher workers can split the load with a shared subscription.
Reported states (and, for library users, events and telemetry) are handed to their callbacks
on one inbound thread (`fleet/delivery/inbound.py`), never on the MQTT network thread, so
ingest never delays chunk requests.

Errors: `start` raises FleetTransportError when the broker is unreachable;
`publish_desired` raises FleetMisuseError for a bad addressee and FleetTransportError when
disconnected. Request handling never raises: bad requests are logged and answered 4xx.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from agent.contract.protocol import (
    MAX_CHUNK_SIZE,
    ChunkHeader,
    Event,
    ObjectRequest,
    ReportedState,
    TopicKind,
    Topics,
    decode_request,
    encode_chunk,
    parse_topic,
)
from agent.errors import EdgefleetError, MessageError, MisuseError
from agent.logs import log_event
from agent.transport import Message, Transport
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.inbound import DeviceInbound
from fleet.delivery.malformed import MalformedLog
from fleet.errors import FleetMisuseError, FleetTransportError

logger = logging.getLogger(__name__)


class PublisherSettings(BaseModel):
    """Limits of the publisher (bytes, seconds, counts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bytes_per_s: Annotated[int, Field(ge=0)] = 64 * 1024 * 1024  # 0 = unlimited
    burst_bytes: Annotated[int, Field(ge=MAX_CHUNK_SIZE)] = 4 * 1024 * 1024
    max_pending_per_device: Annotated[int, Field(ge=1, le=1024)] = 16
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    workers: Annotated[int, Field(ge=1, le=64)] = 2
    response_expiry_s: Annotated[int, Field(ge=1, le=3600)] = 60
    share_group: str | None = None  # e.g. "edgefleet-publish": subscribe via $share/edgefleet-publish/...
    ingest_share_group: str | None = None  # e.g. "edgefleet-ingest": reports, events, telemetry shared
    serve_requests: bool = True  # False: an ingest worker or a controller (publishes, answers nothing)
    request_log_size: Annotated[int, Field(ge=0, le=10_000_000)] = 100_000
    inbound_queue_size: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000


class TokenBucket:
    """Bytes-per-second limiter; `take(n)` blocks until `n` tokens are available."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: float) -> None:
        if self.rate <= 0:
            return
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= n:
                    self._tokens -= n
                    return
                short = (n - self._tokens) / self.rate
            time.sleep(min(short, 0.5))


class Publisher:
    """Serve chunk requests from `repo_dir` and publish retained desired-state documents.

    Pass either an `MqttConfig` (the publisher builds its own `MqttTransport`) or any
    `Transport`. `request_log` keeps `(device_id, path, offset)` of every served request.
    Delivery is at-least-once: report/event/telemetry callbacks may see a message twice
    (reported state is a snapshot, events carry `seq`), so they must be idempotent.
    Raises FleetMisuseError for a bad prefix.
    """

    def __init__(
        self,
        mqtt: MqttConfig | Transport,
        prefix: str,
        repo_dir: Path,
        settings: PublisherSettings | None = None,
    ) -> None:
        self.transport: Transport = MqttTransport(mqtt) if isinstance(mqtt, MqttConfig) else mqtt
        cfg = self.transport.config if isinstance(self.transport, MqttTransport) else None
        self._broker = f"{cfg.host}:{cfg.port}" if cfg is not None else "(an injected transport)"
        try:
            self.topics = Topics(prefix)
        except MisuseError as exc:
            raise FleetMisuseError(str(exc)) from exc
        self.repo_dir = Path(repo_dir).resolve()
        self.settings = settings or PublisherSettings()
        self._bucket = TokenBucket(self.settings.bytes_per_s, self.settings.burst_bytes)
        self._queue: queue.Queue[tuple[str, Message, ObjectRequest] | None] = queue.Queue(
            self.settings.queue_size
        )
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self.request_log: deque[tuple[str, str, int]] = deque(maxlen=self.settings.request_log_size)
        self.bytes_sent = 0
        self.chunks_sent = 0
        self.refused: Counter[int] = Counter()
        self.malformed = MalformedLog(logger)  # counted for /metrics, logged with a rate limit
        # Device -> fleet messages are handled off the MQTT network thread (fleet/delivery/inbound.py).
        self.inbound = DeviceInbound(self.topics, self.malformed, self.settings.inbound_queue_size)

    # --- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Subscribe to requests (and reports if callbacks are set) and start the workers.

        Raises `FleetTransportError` when the broker cannot be reached within `timeout`.
        """
        if self.settings.serve_requests:
            self.transport.subscribe(self.topics.all_requests(self.settings.share_group), self._on_request)
        self.inbound.start(self.transport, self.settings.ingest_share_group)
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._work, name=f"publisher-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        log_event(logger, "publisher.connecting", broker=self._broker, timeout_s=timeout)
        try:
            self.transport.connect(timeout)
        except EdgefleetError as exc:
            raise FleetTransportError(f"publisher cannot reach the broker: {exc}") from exc
        log_event(logger, "publisher.started", repo=str(self.repo_dir), share=self.settings.share_group)

    def stop(self) -> None:
        """Stop the workers and disconnect."""
        for _ in self._workers:
            self._queue.put(None)
        for t in self._workers:
            t.join(timeout=10)
        self._workers.clear()
        self.transport.close()
        self.inbound.stop()

    def on_reported(self, cb: Callable[[str, ReportedState], None]) -> None:
        """Call `cb(device_id, state)` for every valid reported state (register before `start`)."""
        self.inbound.on_reported(cb)

    def on_event(self, cb: Callable[[str, Event], None]) -> None:
        """Call `cb(device_id, event)` for every valid event (register before `start`)."""
        self.inbound.on_event(cb)

    def on_telemetry(self, cb: Callable[[str, bytes], None]) -> None:
        """Call `cb(device_id, payload)` for every telemetry message (register before `start`)."""
        self.inbound.on_telemetry(cb)

    @property
    def inbound_check(self) -> Callable[[Message], bool] | None:
        """The gate every device message passes first (e.g. report_verify.ReportVerifier)."""
        return self.inbound.check

    @inbound_check.setter
    def inbound_check(self, check: Callable[[Message], bool] | None) -> None:
        self.inbound.check = check

    # --- desired state and metadata -----------------------------------------------------
    def publish_desired(
        self, device_id: str | None = None, cohort: str | None = None, *, document: bytes
    ) -> str:
        """Publish a signed director document retained for one device or one cohort; return the topic.

        An empty `document` clears the retained message.

        Raises `FleetMisuseError` (neither or both addressees, bad topic) or `FleetTransportError`
        (the broker refused or is unreachable).
        """
        if (device_id is None) == (cohort is None):
            raise FleetMisuseError("give exactly one of device_id or cohort")
        try:
            topic = self.topics.desired(device_id) if device_id else self.topics.cohort_desired(str(cohort))
            self.transport.publish(topic, document, qos=1, retain=True)
        except EdgefleetError as exc:
            raise _fleet_error(exc) from exc
        log_event(logger, "publisher.desired", topic=topic, size=len(document))
        return topic

    def publish_metadata(self, name: str = "timestamp.json") -> str:
        """Publish `metadata/<name>` retained, so devices learn of a new repository version at once.

        Raises `FleetMisuseError` (the file cannot be read: repository not initialised) or
        `FleetTransportError` (the broker refused or is unreachable).
        """
        try:
            data = (self.repo_dir / "metadata" / name).read_bytes()
            topic = self.topics.metadata(name)
            self.transport.publish(topic, data, qos=1, retain=True)
        except OSError as exc:
            raise FleetMisuseError(f"cannot read metadata/{name}: {exc}") from exc
        except EdgefleetError as exc:
            raise _fleet_error(exc) from exc
        return topic

    # --- requests -----------------------------------------------------------------------
    def _refuse(self, msg: Message, req: ObjectRequest, status: int, reason: str) -> None:
        self.refused[status] += 1
        header = ChunkHeader(
            request_id=req.request_id,
            path=req.path,
            offset=req.offset,
            status=status,  # type: ignore[arg-type]
            reason=reason,
        )
        self._answer(msg, encode_chunk(header))

    def _answer(self, msg: Message, frame: bytes) -> None:
        assert msg.response_topic is not None
        try:
            self.transport.publish(
                msg.response_topic,
                frame,
                qos=1,
                correlation_data=msg.correlation_data,
                message_expiry_s=self.settings.response_expiry_s,
            )
        except EdgefleetError as exc:
            log_event(logger, "publisher.answer_failed", level=logging.WARNING, error=str(exc))

    def _on_request(self, msg: Message) -> None:
        try:
            parsed = parse_topic(self.topics.prefix, msg.topic)
            if parsed.kind is not TopicKind.REQUEST or parsed.device_id is None:
                raise MessageError(f"not a request topic: {msg.topic}")
            device = parsed.device_id
            if msg.response_topic != self.topics.responses(device) or not msg.correlation_data:
                raise MessageError(f"{device}: response topic must be its own and correlation data set")
            req = decode_request(msg.payload)
            if bytes.fromhex(req.request_id) != msg.correlation_data:
                raise MessageError(f"{device}: request id and correlation data differ")
        except MessageError as exc:
            self.refused[400] += 1
            self.malformed.note("request", str(exc), topic=msg.topic)
            self._answer_bad_request(msg, str(exc))
            return
        with self._lock:
            if self._pending[device] >= self.settings.max_pending_per_device:
                busy = True
            else:
                busy = False
                self._pending[device] += 1
        if busy:
            self._refuse(msg, req, 429, "too many requests in flight")
            return
        try:
            self._queue.put_nowait((device, msg, req))
        except queue.Full:
            with self._lock:
                self._pending[device] -= 1
            self._refuse(msg, req, 503, "publisher busy")

    def _answer_bad_request(self, msg: Message, reason: str) -> None:
        """Answer 400 only where the answer is safe to send: the requester's own response topic."""
        try:
            parsed = parse_topic(self.topics.prefix, msg.topic)
        except MessageError:
            return
        corr = msg.correlation_data
        if (
            parsed.device_id is None
            or msg.response_topic != self.topics.responses(parsed.device_id)
            or corr is None
            or not 4 <= len(corr) <= 32
        ):
            return
        header = ChunkHeader(request_id=corr.hex(), path="", offset=0, status=400, reason=reason[:256])
        self._answer(msg, encode_chunk(header))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            device, msg, req = item
            try:
                self._serve(device, msg, req)
            except Exception:  # keep serving others whatever one request does
                logger.exception("serving %s for %s failed", req.path, device)
            finally:
                with self._lock:
                    self._pending[device] -= 1
                    if self._pending[device] <= 0:
                        del self._pending[device]

    def resolve(self, rel_path: str) -> Path | None:
        """The file for object path `rel_path` inside the repository, or None (missing or escaping)."""
        candidate = (self.repo_dir / rel_path).resolve()
        if not candidate.is_relative_to(self.repo_dir) or not candidate.is_file():
            return None
        return candidate

    def _serve(self, device: str, msg: Message, req: ObjectRequest) -> None:
        self.request_log.append((device, req.path, req.offset))
        file = self.resolve(req.path)
        if file is None:
            self._refuse(msg, req, 404, "no such object")
            return
        with file.open("rb") as f:
            st = os.fstat(f.fileno())
            total = st.st_size
            if req.offset > total or (req.offset == total and total > 0):
                self._refuse(msg, req, 416, f"offset past the end ({total} bytes)")
                return
            f.seek(req.offset)
            payload = f.read(min(req.length, MAX_CHUNK_SIZE))
        self._bucket.take(len(payload))
        header = ChunkHeader(
            request_id=req.request_id,
            path=req.path,
            offset=req.offset,
            total_length=total,
            status=200,
            final=req.offset + len(payload) == total,
            etag=f"{total:x}-{st.st_mtime_ns:x}",
        )
        self._answer(msg, encode_chunk(header, payload))
        self.bytes_sent += len(payload)
        self.chunks_sent += 1


def _fleet_error(exc: EdgefleetError) -> Exception:
    if isinstance(exc, MisuseError):
        return FleetMisuseError(str(exc))
    return FleetTransportError(str(exc))
