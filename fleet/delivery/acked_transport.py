"""An MQTT transport that acknowledges a QoS 1 message only when told to, in a window it sets.

Why: an ingest worker that acknowledges a report on arrival and dies (SIGKILL) before storing it
has lost it: the device's outbox dropped it at the PUBACK. Acknowledging after the commit moves
the loss window to a redelivery (the broker resends unacknowledged messages when the session
resumes), which the (device, seq) claim deduplicates.

Why a window of its own: the broker sends a client at most its *outgoing window* of
unacknowledged QoS 1 messages, then nothing at all on that connection until one is acknowledged.
Mosquitto 2 sizes that window from the client's CONNECT Receive Maximum when the client sends one
(measured on 2.0.11: 20, 500, 50 for Receive Maximum absent / 500 / 50, whatever the broker's
`max_inflight_messages`), else from `max_inflight_messages` (default 20). The CONNACK's Receive
Maximum is the other direction (what the broker accepts from the client), so it says nothing
about this window. This transport therefore sends `receive_maximum` itself, and its user flushes
well before that many acknowledgements are held, so the window never fills under a working
database; when the database is away it fills and stops only this connection, which carries
one kind of message (telemetry or events: `fleet/delivery/acked_stream.py`), never reported
states.

`end_session()` sends DISCONNECT with Session Expiry Interval 0 (MQTT v5 allows lowering it
there), so the broker drops this client's session at once; the transport does not reconnect after
it. A stopped share-group member uses it (`fleet/delivery/acked_stream.py`); `close()` keeps the
session, as the agent's transport always does.

A token is (connection number, packet id): packet ids are per connection, and after a reconnect
the broker resends what was unacknowledged under new ids, so an acknowledgement for an id of an
earlier connection is not sent (it could confirm another message).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport import Message
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig

logger = logging.getLogger(__name__)

AckToken = tuple[int, int]  # (connection number, MQTT packet id)
AckedHandler = Callable[[Message, AckToken | None], None]


class AckedTransport(MqttTransport):
    """`MqttTransport` whose `subscribe_acked` handlers get each QoS 1 message with a token and
    acknowledge it with `ack(token)`; the broker sends at most `receive_maximum` unacknowledged.
    Messages no acked subscription matches are acknowledged at once (nothing is held by mistake)."""

    def __init__(self, config: MqttConfig, receive_maximum: int) -> None:
        if not 1 <= receive_maximum <= 65535:
            raise ValueError("receive_maximum must be within 1..65535")
        super().__init__(config)
        self.receive_maximum = receive_maximum
        self._client.manual_ack_set(True)
        self._acked: dict[str, AckedHandler] = {}
        self._generation = 0
        self.acks_sent = 0
        self.stale_acks = 0  # tokens of an earlier connection: not sent, the message was resent
        self._ending = threading.Event()  # end_session() sent DISCONNECT: no reconnect after it
        self._ended = threading.Event()

    def subscribe_acked(self, topic_filter: str, handler: AckedHandler, qos: int = 1) -> None:
        with self._lock:
            self._acked[topic_filter] = handler
        self.subscribe(topic_filter, lambda _m: None, qos)  # re-sent on every connect

    def ack(self, token: AckToken) -> bool:
        """PUBACK the message of `token`; False (nothing sent) when its connection is gone."""
        generation, mid = token
        with self._lock:  # held while queueing the PUBACK: no reconnect in between
            if generation != self._generation or not self._connected.is_set():
                self.stale_acks += 1
                return False
            self._client.ack(mid, 1)
            self.acks_sent += 1
        return True

    def end_session(self, timeout: float = 5.0) -> bool:
        """DISCONNECT with Session Expiry 0 and stop reconnecting; True once the DISCONNECT was
        written (paho reports it, then closes the socket). False, nothing ended, when it cannot
        be sent within `timeout`, or when the link dropped meanwhile and the broker redelivered
        something on the new connection (the caller's worker is done: it would be lost)."""
        deadline = time.monotonic() + timeout
        seen = self.messages_in
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        while time.monotonic() < deadline:
            with self._lock:  # `_on_disconnect` reads `_ending` under it: the link's own drop cannot
                if self._connected.is_set() and self.messages_in == seen:  # be taken for ours
                    self._ending.set()
                    rc = self._client.disconnect(properties=props)
                    if rc == paho.MQTT_ERR_SUCCESS:
                        break
                    self._ending.clear()  # the link is dropping as we speak: let it reconnect, retry
                    logger.info("end_session: DISCONNECT not queued (%s); retrying", paho.error_string(rc))
                elif self.messages_in != seen:
                    return False
            self._connected.wait(0.1)
        else:
            return False
        if not self._ended.wait(max(0.0, deadline - time.monotonic())):
            logger.warning("end_session: DISCONNECT not written within %.1fs", timeout)
            return False
        return True

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._lock:
            if self._ending.is_set():
                self._closing.set()  # before the supervisor sees the link down: it must not reconnect
                self._ended.set()
        super()._on_disconnect(client, userdata, flags, rc, props)

    def _connect_once(self, first: bool) -> None:
        if not first:  # paho reuses the first CONNECT's properties, Receive Maximum included
            super()._connect_once(first)
            return
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = self.receive_maximum
        self._client.connect(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive_s,
            clean_start=self.config.clean_start,
            properties=props,
        )

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._lock:  # before this connection's (re)deliveries, which follow on this thread
            self._generation += 1
        super()._on_connect(client, userdata, flags, rc, props)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            handlers = [
                h for flt, h in self._acked.items() if paho.topic_matches_sub(_filter_of(flt), msg.topic)
            ]
            token = (self._generation, msg.mid) if msg.qos == 1 else None
        if not handlers:
            super()._on_message(client, userdata, msg)
            if msg.qos == 1:
                client.ack(msg.mid, 1)  # what paho does on its own without manual acks
            return
        self.messages_in += 1
        self.bytes_in += len(msg.payload)
        props = getattr(msg, "properties", None)  # the device's report signature travels in them
        message = Message(topic=msg.topic, payload=bytes(msg.payload), retain=bool(msg.retain),
                          user_properties=tuple(getattr(props, "UserProperty", ()) or ()) if props else ())
        for handler in handlers:
            try:
                handler(message, token)
            except Exception:  # one bad message must not stop the network thread
                logger.exception("acked handler for %s failed", msg.topic)


def _filter_of(topic_filter: str) -> str:
    return topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
