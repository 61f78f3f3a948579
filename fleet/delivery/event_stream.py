"""Lifecycle events on an MQTT connection of their own, each acknowledged after it is stored.

Why: events used to arrive on the publisher's connection, acknowledged on arrival and stored a
few milliseconds later from its inbound queue; an ingest worker SIGKILLed in between lost them
(the agent drops an event from its outbox at the PUBACK, `agent.daemon.events`). Holding the
acknowledgements on the publisher's connection would let a hung telemetry flush, or a full
window, stop reported states too (`fleet/delivery/acked_transport.py`), so events get an
`AckedStream` of their own (`fleet/delivery/acked_stream.py`), beside telemetry's: client id
`<fleet client id>-events`, share group `<ingest group>-events`. Each event is decoded (a
malformed one is counted in the publisher's `MalformedLog`, kind `event`, and acknowledged),
passed to `sink` (the revoked-device filter in front of an `EventBatch`), and acknowledged once
the batch's transaction has committed; the (device, seq) primary key of `device_events` keeps a
redelivered event once (`fleet/delivery/event_log.py`).

Events are few and the rollout controller waits on them, so the stream flushes after 20 ms
rather than telemetry's 1 s, and at 200 held.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.contract.protocol import Event, decode_event
from agent.errors import MessageError
from agent.transport import Message
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.acked_stream import AckedStream, StreamSettings
from fleet.delivery.malformed import MalformedLog

EVENT_SETTINGS = StreamSettings(window=1000, flush_at=200, flush_after_s=0.02, retry_s=0.5)


class EventStream(AckedStream):
    """The events stream: `sink(device, event)` gets every valid event, `flush()` stores them."""

    name = "event-stream"
    kind = "events"

    def __init__(
        self,
        config: MqttConfig,
        prefix: str,
        share_group: str | None,
        sink: Callable[[str, Event], object],
        flush: Callable[[], object],
        malformed: MalformedLog,
        settings: StreamSettings | None = None,
        check: Callable[[Message], bool] | None = None,
    ) -> None:
        self.sink = sink
        self.malformed = malformed
        super().__init__(config, prefix, share_group, self._decode, flush, settings or EVENT_SETTINGS, check)

    def _decode(self, device_id: str, payload: bytes) -> None:
        try:
            event = decode_event(payload, device_id)
        except MessageError as exc:
            self.malformed.note("event", str(exc), device=device_id)
            return
        self.sink(device_id, event)
