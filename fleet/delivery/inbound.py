"""Device -> fleet messages on the publisher's connection, handed to callbacks off the network thread.

Why a thread of its own: the callbacks write the database and merge sketches; on paho's
network thread a thousand devices' reports would delay every chunk request behind them, and
devices waiting for chunks time out and ask again (congestion collapse). One thread, a bounded
queue, arrival order kept; when the queue is full the network thread waits (backpressure,
counted in `stalls`). `check` (the signed-report gate, `fleet/delivery/report_verify.py`) runs
first and drops what it refuses. A fleet process's own ingest takes telemetry and events on
their acked streams (`fleet/delivery/acked_stream.py`) and reported states here; the callbacks
for events and telemetry stay for library users (the simulator, tests).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

from agent.contract.protocol import (
    Event,
    ReportedState,
    TopicKind,
    Topics,
    decode_event,
    decode_reported,
    parse_topic,
)
from agent.errors import MessageError
from agent.transport import Message, Transport
from fleet.delivery.malformed import MalformedLog

T = TypeVar("T")
logger = logging.getLogger(__name__)


class DeviceInbound:
    """Reported states, events and telemetry of every device, to their callbacks in arrival order."""

    def __init__(self, topics: Topics, malformed: MalformedLog, queue_size: int) -> None:
        self.topics = topics
        self.malformed = malformed  # shared with the publisher's request handling (one /metrics family)
        self.check: Callable[[Message], bool] | None = None  # e.g. report_verify.ReportVerifier
        self.stalls = 0  # times the network thread waited for room in the queue
        self._reported_cbs: list[Callable[[str, ReportedState], None]] = []
        self._event_cbs: list[Callable[[str, Event], None]] = []
        self._telemetry_cbs: list[Callable[[str, bytes], None]] = []
        self._queue: queue.Queue[tuple[Callable[[Message], None], Message] | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None

    def on_reported(self, cb: Callable[[str, ReportedState], None]) -> None:
        self._reported_cbs.append(cb)

    def on_event(self, cb: Callable[[str, Event], None]) -> None:
        self._event_cbs.append(cb)

    def on_telemetry(self, cb: Callable[[str, bytes], None]) -> None:
        self._telemetry_cbs.append(cb)

    def pending(self) -> int:
        """Messages queued for the callbacks."""
        return self._queue.qsize()

    def start(self, transport: Transport, share_group: str | None) -> None:
        """Subscribe the kinds that have callbacks (via `share_group`) and start the thread."""
        devices, group = self.topics.all_devices, share_group
        if self._reported_cbs:
            transport.subscribe(devices("reported", group), self._deferred(self._on_reported))
        if self._event_cbs:
            transport.subscribe(devices("events", group), self._deferred(self._on_event))
        if self._telemetry_cbs:
            transport.subscribe(devices("telemetry", group), self._deferred(self._on_telemetry))
        self._thread = threading.Thread(target=self._loop, name="publisher-inbound", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _deferred(self, handler: Callable[[Message], None]) -> Callable[[Message], None]:
        """Wrap `handler` to run on the inbound thread instead of the MQTT network thread."""

        def enqueue(msg: Message) -> None:
            try:
                self._queue.put_nowait((handler, msg))
            except queue.Full:  # ingest is far behind: hold the network thread (backpressure)
                self.stalls += 1
                self._queue.put((handler, msg))

        return enqueue

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            handler, msg = item
            try:
                if self.check is None or self.check(msg):  # signed reports (issue 14)
                    handler(msg)
            except Exception:  # a failing callback must not stop the others
                logger.exception("publisher inbound handler failed on %s", msg.topic)

    def _device_of(self, msg: Message, kind: TopicKind) -> str | None:
        try:
            parsed = parse_topic(self.topics.prefix, msg.topic)
        except MessageError:
            return None
        return parsed.device_id if parsed.kind is kind else None

    def _on_reported(self, msg: Message) -> None:
        if msg.payload:  # (an empty payload clears a retained reported state: nothing to say)
            self._fan_out(msg, TopicKind.REPORTED, "report", decode_reported, self._reported_cbs)

    def _on_event(self, msg: Message) -> None:
        self._fan_out(msg, TopicKind.EVENTS, "event", decode_event, self._event_cbs)

    def _fan_out(self, msg: Message, kind: TopicKind, what: str, decode: Callable[[bytes, str], T],
                 callbacks: list[Callable[[str, T], None]]) -> None:
        """Decode a message of a device's `kind` topic and hand it to every callback; a payload
        that does not decode is noted in the malformed log (as `what`) and goes no further."""
        device = self._device_of(msg, kind)
        if device is None:
            return
        try:
            decoded = decode(msg.payload, device)
        except MessageError as exc:
            self.malformed.note(what, str(exc), device=device)
            return
        for cb in callbacks:
            cb(device, decoded)

    def _on_telemetry(self, msg: Message) -> None:
        device = self._device_of(msg, TopicKind.TELEMETRY)
        if device is not None:
            for cb in self._telemetry_cbs:
                cb(device, msg.payload)
