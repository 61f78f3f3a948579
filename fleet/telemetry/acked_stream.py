"""Telemetry on an MQTT connection of its own, each report acknowledged after the flush that stored it.

An ingest worker killed with SIGKILL loses nothing it acknowledged: a report is PUBACKed only
once a `TelemetryStore.flush` that began after it was ingested has committed, so whatever the
worker held is redelivered to its session (stable client id `<fleet client id>-telemetry`) when
it starts again in its slot, and the (device, seq) claim stores it once.

Why a connection of its own: held acknowledgements use up the broker's outgoing window for that
connection, and a full window stops *every* delivery on it (fleet/delivery/acked_transport.py).
Reported states and events, which rollouts wait for, stay on the publisher's connection and are
acknowledged on arrival as before; only telemetry waits here. The window is the CONNECT Receive
Maximum this connection sends (`window`), and the stream flushes at `flush_at` held reports
(half the window by default, so the broker keeps sending while a flush runs) or when the oldest
has waited `flush_after_s` (1 s: each flush has a fixed cost, several statements under a
lock the workers share, so fewer, larger flushes go faster). A flush that fails acknowledges
nothing and is retried every `retry_s`; meanwhile the window fills and the broker queues the rest
of this worker's share of the telemetry in its session, while control traffic flows on.

The share group is `<ingest group>-telemetry`, not the ingest group: a fleet client of an older
release still has a telemetry subscription in its persistent session in the ingest group, and
the broker would hand that session a share of the reports, which it would drop.
`retire_legacy_subscription` unsubscribes it on the publisher's connection.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.contract.protocol import TopicKind, Topics, parse_topic
from agent.errors import EdgefleetError, MessageError
from agent.logs import log_event
from agent.transport import Message, Transport
from agent.transport.mqtt_client import MqttConfig
from fleet.delivery.acked_transport import AckedTransport, AckToken
from fleet.errors import FleetMisuseError, FleetTransportError

log = logging.getLogger("edgefleet.fleet.telemetry")


@dataclass(frozen=True)
class StreamSettings:
    """Window (messages), flush thresholds (messages, seconds)."""

    window: int = 2000  # CONNECT Receive Maximum: unacknowledged reports the broker sends at most
    flush_at: int = 1000  # held acknowledgements that trigger a flush; <= window
    flush_after_s: float = 1.0  # a flush has a fixed cost (several statements, a lock shared by workers)
    retry_s: float = 0.5  # after a failed flush

    def __post_init__(self) -> None:
        if not 1 <= self.flush_at <= self.window <= 65535 or self.flush_after_s <= 0 or self.retry_s <= 0:
            raise FleetMisuseError("telemetry stream: need 1 <= flush_at <= window <= 65535, times > 0")


class TelemetryStream:
    """Subscribe telemetry on its own connection; `ingest(device, payload)` buffers a report and
    `flush()` commits the buffer (raising when it cannot). Both run on the stream's one worker
    thread, so a flush that returned has stored everything ingested before it began."""

    name = "telemetry-stream"

    def __init__(
        self,
        config: MqttConfig,
        prefix: str,
        share_group: str | None,
        ingest: Callable[[str, bytes], object],
        flush: Callable[[], object],
        settings: StreamSettings | None = None,
        check: Callable[[Message], bool] | None = None,
    ) -> None:
        self.settings = settings or StreamSettings()
        self.topics = Topics(prefix)
        self.topic_filter = self.topics.all_devices("telemetry", share_group)
        self.transport = AckedTransport(config, receive_maximum=self.settings.window)
        self._ingest = ingest
        self._check = check  # e.g. report_verify.ReportVerifier: False drops (and acks) the message
        self._flush = flush
        self._inbox: queue.Queue[tuple[Message, AckToken | None] | None] = queue.Queue()  # <= window
        self._held: list[AckToken] = []
        self._held_since = 0.0
        self._retry_at = 0.0
        self._thread: threading.Thread | None = None
        self.flushes = 0
        self.flush_failures = 0
        self.max_held = 0  # the most acknowledgements held at once (never above the window)

    def start(self, timeout: float = 10.0) -> None:
        self.transport.subscribe_acked(self.topic_filter, lambda m, t: self._inbox.put((m, t)))
        self._thread = threading.Thread(target=self._run, name="telemetry-stream", daemon=True)
        self._thread.start()
        try:
            self.transport.connect(timeout)
        except EdgefleetError as exc:
            raise FleetTransportError(f"telemetry stream cannot reach the broker: {exc}") from exc
        log_event(
            log,
            "telemetry.stream_started",
            client=self.transport.config.client_id,
            window=self.settings.window,
            flush_at=self.settings.flush_at,
        )

    def stop(self) -> None:
        """Store and acknowledge what arrived, then disconnect (what the final flush could not
        store stays unacknowledged: the broker redelivers it to this slot's next start)."""
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        self.transport.close()

    @property
    def held(self) -> int:
        return len(self._held)

    def _run(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=self._wait_s())
            except queue.Empty:  # the oldest held report has waited long enough
                self._commit(force=False)
                continue
            if item is None:
                self._commit(force=True)
                return
            self._take(*item)
            self._commit(force=False)

    def _wait_s(self) -> float | None:
        if not self._held:
            return None
        due = max(self._held_since + self.settings.flush_after_s, self._retry_at)
        return max(0.0, due - time.monotonic())

    def _take(self, msg: Message, token: AckToken | None) -> None:
        try:
            parsed = parse_topic(self.topics.prefix, msg.topic)
            device = parsed.device_id if parsed.kind is TopicKind.TELEMETRY else None
        except MessageError:
            device = None
        if device is not None and (self._check is None or self._check(msg)):
            try:
                self._ingest(device, msg.payload)
            except Exception:  # its own flush failed: the report stays buffered, and held
                log.exception("telemetry ingest failed; the report stays unacknowledged")
        if token is not None:
            if not self._held:
                self._held_since = time.monotonic()
            self._held.append(token)
            self.max_held = max(self.max_held, len(self._held))

    def _commit(self, force: bool) -> None:
        """Flush and acknowledge when due: `flush_at` held, or the oldest held `flush_after_s`."""
        if not self._held:
            return
        now = time.monotonic()
        cfg = self.settings
        due = len(self._held) >= cfg.flush_at or now - self._held_since >= cfg.flush_after_s
        if not force and (not due or now < self._retry_at):
            return
        self.flushes += 1
        try:
            self._flush()
        except Exception as exc:  # the database is away: hold on, retry later
            self.flush_failures += 1
            self._retry_at = now + self.settings.retry_s
            log_event(log, "telemetry.flush_failed", logging.WARNING, held=len(self._held), error=str(exc))
            return
        tokens, self._held = self._held, []
        for token in tokens:
            self.transport.ack(token)  # False for an earlier connection: redelivered, deduplicated


def retire_legacy_subscription(transport: Transport, prefix: str, share_group: str | None) -> None:
    """Have `transport` unsubscribe telemetry on every connect: a session of an older release still
    has it (persistent sessions keep subscriptions), and would take reports it then drops."""
    topic_filter = Topics(prefix).all_devices("telemetry", share_group)
    transport.add_on_connect(lambda _present: transport.unsubscribe(topic_filter))
