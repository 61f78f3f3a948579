"""What the agent sends the fleet: reported state, events and telemetry, each signed when the
device has a report key.

Why one place: the three go out over the same transport with the same signing and the same
rule for a link that is down (nothing is lost: reported state is retained and re-sent on every
connect, events wait in the on-disk `EventOutbox`, telemetry in the `ReportQueue`), and the
daemon (`agent.daemon.core`) stays about wiring. What the reported state says is the
daemon's (`AgentDaemon.reported_state`, which a simulated device overrides); publishing it is
here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.contract.protocol import ReportedState, Topics, encode_reported
from agent.daemon.events import EventOutbox, encode_event_bounded
from agent.daemon.report_signer import ReportSigner, sign_or_nothing
from agent.errors import EdgefleetError
from agent.logs import log_event
from agent.telemetry.queue import ReportQueue
from agent.transport import Delivery
from agent.transport.mqtt_client import MqttTransport

log = logging.getLogger("edgefleet.agent")


class Uplink:
    """Publishes the device's reported state, events and telemetry reports; thread-safe."""

    def __init__(self, transport: MqttTransport, topics: Topics, device_id: str, signer: ReportSigner | None,
                 outbox: EventOutbox, queue: ReportQueue) -> None:
        self.transport, self.topics, self.device_id = transport, topics, device_id
        self.signer, self.outbox, self.queue = signer, outbox, queue
        self._event_seq = 0
        self._events_lock = threading.Lock()
        self._reported_lock = threading.Lock()

    def set_will(self, offline: ReportedState) -> None:
        """The retained reported state the broker publishes when the link dies."""
        payload = encode_reported(offline)
        self.transport.set_will(self.topics.reported(), payload, retain=True,
                                user_properties=sign_or_nothing(self.signer, "reported", payload))

    def publish_reported(self, state: Callable[[], ReportedState]) -> bool:
        """Publish the retained reported state `state()` builds; False when offline (it is
        sent again on connect) or when the transport refuses it."""
        if not self.transport.connected:
            return False
        with self._reported_lock:
            try:
                payload = encode_reported(state())
                self.transport.publish(self.topics.reported(), payload, qos=1, retain=True,
                                       user_properties=sign_or_nothing(self.signer, "reported", payload))
            except EdgefleetError as exc:
                log_event(log, "agent.report_failed", logging.DEBUG, error=str(exc))
                return False
        return True

    def event(self, kind: str, **fields: Any) -> None:
        """Store one event (fields: `encode_event_bounded`'s) and send what is stored."""
        with self._events_lock:
            self._event_seq = max(self._event_seq + 1, time.time_ns() // 1000)
            seq = self._event_seq
        self.outbox.put(encode_event_bounded(self.device_id, kind, seq, **fields))
        self.flush_events()

    def flush_events(self) -> None:
        """Send stored events in order; each stays on disk until the broker's PUBACK (at least once).

        Runs on any thread, the MQTT network thread included (on connect, director events), so
        it never waits for an acknowledgement: a later flush forgets the acknowledged ones.
        """

        def send(payload: bytes) -> Delivery | None:
            if not self.transport.connected:
                return None
            try:
                return self.transport.publish(self.topics.events(), payload, qos=1,
                                              user_properties=sign_or_nothing(self.signer, "events", payload))
            except EdgefleetError:
                return None

        self.outbox.drain(send)

    def send_telemetry(self) -> int:
        """Send queued telemetry reports oldest first; returns how many went."""

        def send(seq: int, payload: bytes) -> bool:
            if not self.transport.connected:
                return False
            try:
                self.transport.publish(self.topics.telemetry(), payload, qos=1,
                                       user_properties=sign_or_nothing(self.signer, "telemetry", payload))
            except EdgefleetError:
                return False
            return True

        return self.queue.drain(send)
