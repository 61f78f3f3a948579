"""Pure translations between `agent.transport` and paho-mqtt's MQTT v5 objects.

Kept apart from `agent.transport.mqtt_client` (the connection and its threads) so that what goes
on the wire is decided by functions over values, testable without a broker: the size limit a
publish must respect, the v5 properties of a publish or a Last Will, a received paho message as
our `Message`, and which subscriptions a topic reaches (`$share/<group>/` stripped: the broker
delivers a shared subscription's messages on the plain topic).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport import Message

# room left under the broker's Maximum Packet Size for the fixed header, topic and properties
PACKET_OVERHEAD = 512
H = TypeVar("H")


def size_limit(max_message_bytes: int, broker_max_packet: int | None) -> int:
    """The largest payload to send: paho does not check the broker's maximum packet size, and an
    oversize publish gets the client disconnected in a loop."""
    if broker_max_packet:
        return min(max_message_bytes, int(broker_max_packet) - PACKET_OVERHEAD)
    return max_message_bytes


def will_properties(user_properties: tuple[tuple[str, str], ...]) -> Properties | None:
    """The Last Will's properties (None without user properties)."""
    if not user_properties:
        return None
    props = Properties(PacketTypes.WILLMESSAGE)
    props.UserProperty = list(user_properties)
    return props


def publish_properties(response_topic: str | None, correlation_data: bytes | None,
                       message_expiry_s: int | None,
                       user_properties: tuple[tuple[str, str], ...]) -> Properties | None:
    """A PUBLISH's v5 properties (None when it has none, so paho sends none)."""
    if not (response_topic or correlation_data or message_expiry_s or user_properties):
        return None
    props = Properties(PacketTypes.PUBLISH)
    if user_properties:
        props.UserProperty = list(user_properties)
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation_data:
        props.CorrelationData = correlation_data
    if message_expiry_s:
        props.MessageExpiryInterval = int(message_expiry_s)
    return props


def to_message(msg: paho.MQTTMessage) -> Message:
    """A received paho message as a `Message` (payload copied, absent properties as None/())."""
    props = getattr(msg, "properties", None)
    corr = getattr(props, "CorrelationData", None) if props else None
    return Message(
        topic=msg.topic,
        payload=bytes(msg.payload),
        retain=bool(msg.retain),
        response_topic=getattr(props, "ResponseTopic", None) if props else None,
        correlation_data=bytes(corr) if corr else None,
        user_properties=tuple(getattr(props, "UserProperty", ()) or ()) if props else (),
    )


def strip_share(topic_filter: str) -> str:
    """The topic filter a `$share/<group>/<filter>` subscription matches."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def handlers_for(subs: Iterable[tuple[str, H]], topic: str) -> list[H]:
    """The handlers of every subscription (filter, handler) whose filter matches `topic`."""
    return [h for flt, h in subs if paho.topic_matches_sub(strip_share(flt), topic)]
