"""One kind of device message on an MQTT connection of its own, each acknowledged after it is stored.

An ingest worker killed with SIGKILL loses nothing it acknowledged: a message is PUBACKed only
once a `flush` that began after it was ingested has committed, so whatever the worker held is
redelivered to its session (a stable client id per process slot) when it starts again, and the
store's unique key keeps it once: (device, seq) for telemetry (`fleet/telemetry/ingest.py`) and
for events (`fleet/delivery/event_log.py`). Telemetry and events each have one such stream
(`fleet/telemetry/acked_stream.py`, `fleet/delivery/event_stream.py`).

Why a connection per stream: held acknowledgements use up the broker's outgoing window for that
connection, and a full window stops *every* delivery on it (fleet/delivery/acked_transport.py).
Reported states and dataset chunks stay on the publisher's connection, acknowledged on arrival,
and a telemetry flush that hangs stops neither them nor the events. The window is the CONNECT
Receive Maximum this connection sends (`window`); the stream flushes at `flush_at` held messages
(half the window by default, so the broker keeps sending while a flush runs) or when the oldest
has waited `flush_after_s`. A flush that fails acknowledges nothing and is retried every
`retry_s`; meanwhile the window fills and the broker queues the rest of this worker's share in
its session.

A graceful `stop()` of a member of a share group (`end_session`) ends its session instead of
leaving it to be handed a share nobody takes until it expires (1 h). Mosquitto 2.0.11 does not
pass what a session held or had queued to the other members when that session ends (measured:
a member holding 20 unacknowledged messages with 180 more queued, disconnected with Session
Expiry 0, lost all 200; the MQTT spec only says SHOULD), so the stream first unsubscribes (the
broker then routes new messages to the other members, and still delivers what it had queued for
this session), stores and acknowledges what keeps arriving until nothing has come for
`drain_quiet_s` and nothing is held, and only then disconnects with Session Expiry 0. When it
cannot drain (the database is away) it disconnects keeping its session, as a SIGKILL would, so
the slot's next start gets what it held.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent.contract.protocol import TopicKind, Topics, parse_topic
from agent.errors import EdgefleetError, MessageError
from agent.logs import log_event
from agent.transport import Message, Transport
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.acked_transport import AckedTransport, AckToken
from fleet.errors import FleetMisuseError, FleetTransportError

log = logging.getLogger("edgefleet.fleet.streams")
StreamKind = Literal["telemetry", "events"]


@dataclass(frozen=True)
class StreamSettings:
    """Window (messages), flush thresholds (messages, seconds), and the graceful stop's drain."""

    window: int = 2000  # CONNECT Receive Maximum: unacknowledged messages the broker sends at most
    flush_at: int = 1000  # held acknowledgements that trigger a flush; <= window
    flush_after_s: float = 1.0  # a flush has a fixed cost (several statements, a lock shared by workers)
    retry_s: float = 0.5  # after a failed flush
    end_session: bool = False  # stop(): drain, then end the session (share-group members)
    drain_quiet_s: float = 0.5  # drained: nothing arrived for this long and nothing is held
    drain_timeout_s: float = 20.0  # give up draining (keep the session) after this long

    def __post_init__(self) -> None:
        if not 1 <= self.flush_at <= self.window <= 65535 or min(
                self.flush_after_s, self.retry_s, self.drain_quiet_s, self.drain_timeout_s) <= 0:
            raise FleetMisuseError("acked stream: need 1 <= flush_at <= window <= 65535, times > 0")


class AckedStream:
    """Subscribe one topic kind (`kind`, e.g. "telemetry") of every device on its own connection;
    `ingest(device, payload)` buffers a message and `flush()` commits the buffer (raising when it
    cannot). Both run on the stream's one worker thread, so a flush that returned has stored
    everything ingested before it began. `check(msg)` (the report signature gate) False drops a
    message, which is then acknowledged with the rest. A subclass names its stream: `name` (the
    service component and its thread) and `kind` (the topic kind, and the metrics' `stream` label)."""

    name: str
    kind: StreamKind

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
        self.topic_filter = self.topics.all_devices(self.kind, share_group)
        self.transport = AckedTransport(config, receive_maximum=self.settings.window)
        self._topic_kind = TopicKind(self.kind)
        self._ingest = ingest
        self._check = check
        self._flush = flush
        self._inbox: queue.Queue[tuple[Message, AckToken | None] | None] = queue.Queue()  # <= window
        self._held: list[AckToken] = []
        self._held_since = 0.0
        self._retry_at = 0.0
        self._thread: threading.Thread | None = None
        self.flushes = 0
        self.flush_failures = 0
        self.max_held = 0  # the most acknowledgements held at once (never above the window)
        self.session_ended = False  # the last stop() ended the broker session (drained)

    def start(self, timeout: float = 10.0) -> None:
        self.transport.subscribe_acked(self.topic_filter, lambda m, t: self._inbox.put((m, t)))
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        try:
            self.transport.connect(timeout)
        except EdgefleetError as exc:
            raise FleetTransportError(f"{self.kind} stream cannot reach the broker: {exc}") from exc
        log_event(log, "stream.started", stream=self.kind, client=self.transport.config.client_id,
                  window=self.settings.window, flush_at=self.settings.flush_at)

    def stop(self) -> None:
        """Store and acknowledge what arrived, then disconnect. With `end_session`: unsubscribe,
        drain and end the session (module docstring); otherwise, or when the drain fails, what
        could not be stored stays unacknowledged, and the broker redelivers it to this slot's
        next start."""
        drained = False
        if self._thread is not None:
            if self.settings.end_session and self.transport.connected:
                self.transport.unsubscribe(self.topic_filter)  # what was queued still arrives
            self._inbox.put(None)
            self._thread.join(timeout=self.settings.drain_timeout_s + 30)
            self._thread = None
            drained = self.settings.end_session and not self._held
        self.session_ended = drained and self.transport.end_session()
        self.transport.close()
        log_event(log, "stream.stopped", stream=self.kind, session_ended=self.session_ended, held=self.held,
                  drained=drained, flushes=self.flushes, flush_failures=self.flush_failures)

    @property
    def held(self) -> int:
        return len(self._held)

    def _run(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=self._wait_s())
            except queue.Empty:  # the oldest held message has waited long enough
                self._commit(force=False)
                continue
            if item is None:
                self._commit(force=True)
                if self.settings.end_session:
                    self._drain()
                return
            self._take(*item)
            self._commit(force=False)

    def _drain(self) -> None:
        """After the unsubscribe: store and acknowledge what still arrives, until nothing has
        arrived for `drain_quiet_s` and nothing is held, or `drain_timeout_s` passed."""
        cfg = self.settings
        deadline = time.monotonic() + cfg.drain_timeout_s
        while time.monotonic() < deadline:
            try:
                item = self._inbox.get(timeout=cfg.drain_quiet_s)
            except queue.Empty:
                self._commit(force=True)
                if not self._held:
                    return
                continue
            if item is not None:
                self._take(*item)
                self._commit(force=False)
        log_event(log, "stream.drain_incomplete", logging.WARNING, stream=self.kind, held=len(self._held))

    def _wait_s(self) -> float | None:
        if not self._held:
            return None
        due = max(self._held_since + self.settings.flush_after_s, self._retry_at)
        return max(0.0, due - time.monotonic())

    def _take(self, msg: Message, token: AckToken | None) -> None:
        try:
            parsed = parse_topic(self.topics.prefix, msg.topic)
            device = parsed.device_id if parsed.kind is self._topic_kind else None
        except MessageError:
            device = None
        if device is not None and (self._check is None or self._check(msg)):
            try:
                self._ingest(device, msg.payload)
            except Exception:  # its own flush failed: the message stays buffered, and held
                log.exception("%s ingest failed; the message stays unacknowledged", self.kind)
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
            log_event(log, "stream.flush_failed", logging.WARNING, stream=self.kind, held=len(self._held),
                      error=str(exc))
            return
        tokens, self._held = self._held, []
        for token in tokens:
            self.transport.ack(token)  # False for an earlier connection: redelivered, deduplicated


def retire_legacy_subscription(transport: Transport, prefix: str, share_group: str | None,
                               kind: StreamKind = "telemetry") -> None:
    """Have `transport` (the publisher's) unsubscribe `kind` on every connect: a session of an older
    release still has it (persistent sessions keep subscriptions) and would take a share of what
    now belongs to the acked stream, acknowledged on arrival or dropped."""
    topic_filter = Topics(prefix).all_devices(kind, share_group)
    transport.add_on_connect(lambda _present: transport.unsubscribe(topic_filter))


def stream_families(streams: Iterable[AckedStream]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """`edgefleet_ingest_stream_{flushes,flush_failures,acks,stale_acks}_total{stream}` and
    `edgefleet_ingest_stream_held{stream}` of this process's acked streams (fleet/metrics.py)."""
    label = ["stream"]
    flushes = CounterMetricFamily("edgefleet_ingest_stream_flushes", "Flushes an acked ingest stream began "
                                  "(each acknowledges what it stored)", labels=label)
    failures = CounterMetricFamily("edgefleet_ingest_stream_flush_failures", "Flushes that failed (nothing "
                                   "acknowledged; retried)", labels=label)
    acks = CounterMetricFamily("edgefleet_ingest_stream_acks", "Messages acknowledged after they were "
                               "stored", labels=label)
    stale = CounterMetricFamily("edgefleet_ingest_stream_stale_acks", "Acknowledgements not sent: their "
                                "connection was gone (the broker redelivers the message)", labels=label)
    held = GaugeMetricFamily("edgefleet_ingest_stream_held", "Messages received and not yet acknowledged "
                             "(at most the stream's window)", labels=label)
    for s in streams:
        flushes.add_metric([s.kind], s.flushes)
        failures.add_metric([s.kind], s.flush_failures)
        acks.add_metric([s.kind], s.transport.acks_sent)
        stale.add_metric([s.kind], s.transport.stale_acks)
        held.add_metric([s.kind], s.held)
    yield from (flushes, failures, acks, stale, held)
