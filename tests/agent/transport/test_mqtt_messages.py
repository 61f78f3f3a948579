"""The MQTT client's pure parts without a broker: size limit, v5 properties, received messages,
subscription matching (`agent.transport.mqtt_messages`) and the pending requests table
(`agent.transport.mqtt_requests`)."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import TransportError
from agent.transport import Message
from agent.transport.mqtt_messages import (
    PACKET_OVERHEAD,
    handlers_for,
    publish_properties,
    size_limit,
    strip_share,
    to_message,
    will_properties,
)
from agent.transport.mqtt_requests import PendingRequests


@pytest.mark.unit
def test_the_size_limit_is_the_configured_one_or_under_the_brokers_packet_size() -> None:
    assert size_limit(256 * 1024, None) == 256 * 1024
    assert size_limit(256 * 1024, 0) == 256 * 1024  # 0: the CONNACK announced no limit
    assert size_limit(256 * 1024, 4096) == 4096 - PACKET_OVERHEAD
    assert size_limit(1024, 1024 * 1024) == 1024


@pytest.mark.unit
def test_a_publish_without_extras_carries_no_properties() -> None:
    assert publish_properties(None, None, None, ()) is None
    assert will_properties(()) is None


@pytest.mark.unit
def test_publish_properties_carry_what_was_given() -> None:
    props = publish_properties("reply/1", b"c0", 30, (("k", "v"),))
    assert props is not None
    assert (props.ResponseTopic, props.CorrelationData, props.MessageExpiryInterval) == ("reply/1", b"c0", 30)
    assert props.UserProperty == [("k", "v")]
    will = will_properties((("sig", "abc"),))
    assert will is not None and will.UserProperty == [("sig", "abc")]


@pytest.mark.unit
def test_a_received_message_keeps_its_properties_and_misses_none() -> None:
    msg = paho.MQTTMessage(topic=b"edgefleet/v1/devices/gw-1/desired")
    msg.payload, msg.retain = b"doc", True
    assert to_message(msg) == Message(topic="edgefleet/v1/devices/gw-1/desired", payload=b"doc", retain=True)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData, props.UserProperty = "r", b"c1", [("a", "b")]
    msg.properties = props
    got = to_message(msg)
    assert (got.response_topic, got.correlation_data, got.user_properties) == ("r", b"c1", (("a", "b"),))


@pytest.mark.unit
def test_shared_subscriptions_match_on_their_plain_filter() -> None:
    assert strip_share("$share/ingest/edgefleet/v1/devices/+/events") == "edgefleet/v1/devices/+/events"
    assert strip_share("edgefleet/#") == "edgefleet/#"
    subs = [("$share/g/a/+/events", 1), ("a/#", 2), ("b/+", 3)]
    assert handlers_for(subs, "a/gw-1/events") == [1, 2]
    assert handlers_for(subs, "c/x") == []


@pytest.mark.unit
def test_an_answer_resolves_its_request_once_and_others_pass_through() -> None:
    pending = PendingRequests(limit=4)
    corr, fut = pending.open()
    assert len(corr) == 8
    answer = Message(topic="r", payload=b"1", correlation_data=corr)
    assert pending.answer(answer) and fut.result(0) is answer
    assert not pending.answer(answer)  # a duplicate finds nothing: it goes to the handlers
    assert not pending.answer(Message(topic="r", payload=b"x"))  # no correlation data


@pytest.mark.unit
def test_the_table_is_bounded_and_cancelling_frees_a_place() -> None:
    pending = PendingRequests(limit=2)
    first, fut1 = pending.open(b"a")
    _, fut2 = pending.open(b"b")
    with pytest.raises(TransportError, match="2 requests pending"):
        pending.open(b"c")
    pending.cancel(first)
    assert fut1.cancelled()
    _, fut3 = pending.open(b"c")
    pending.cancel_all()
    assert fut2.cancelled() and fut3.cancelled()
    assert not pending.answer(Message(topic="r", payload=b"", correlation_data=b"b"))
