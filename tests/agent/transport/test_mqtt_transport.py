"""MqttTransport against real Mosquitto brokers: reconnect, resubscribe, Last Will, size limits."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent.contract.protocol import Topics, decode_reported
from agent.errors import FetchTimeoutError, MisuseError, TransportError
from agent.transport import Message
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from tests.support.broker import Broker, start_mosquitto

ROOT = Path(__file__).resolve().parents[3]


def _id() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _transport(broker: Broker, **kw: object) -> MqttTransport:
    t = MqttTransport(MqttConfig(port=broker.port, client_id=_id(), reconnect_max_s=0.5, **kw))  # type: ignore[arg-type]
    t.connect()
    return t


@pytest.mark.integration
def test_reconnects_and_resubscribes_after_broker_restart(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "b")
    got: list[bytes] = []
    arrived = threading.Event()

    def handler(m: Message) -> None:
        got.append(m.payload)
        arrived.set()

    try:
        sub = _transport(broker)
        sub.subscribe("x/+/y", handler)
        broker.restart()  # persistence off: the session and its subscriptions are gone
        assert sub.wait_connected(20)
        pub = _transport(broker)
        pub.publish("x/1/y", b"after-restart")
        assert arrived.wait(10)
        assert got == [b"after-restart"]
        assert sub.connects == 2
        with pytest.raises(TransportError):
            broker.stop()
            deadline = time.monotonic() + 10
            while sub.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            sub.publish("x/1/y", b"while down")
        pub.close()
        sub.close()
    finally:
        broker.stop()


@pytest.mark.integration
def test_last_will_marks_a_vanished_device_offline(mosquitto: Broker) -> None:
    dev = _id()
    topics = Topics("ef-will", dev)
    seen: list[bytes] = []
    fleet = _transport(mosquitto)
    fleet.subscribe(topics.reported(), lambda m: seen.append(m.payload))
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from agent.contract.protocol import ReportedState, Topics, encode_reported
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
t = MqttTransport(MqttConfig(port={mosquitto.port}, client_id={dev!r}))
topics = Topics("ef-will", {dev!r})
t.set_will(topics.reported(), encode_reported(ReportedState(state="committed", online=False, timestamp=1.0)))
t.connect()
t.publish(topics.reported(), encode_reported(ReportedState(state="committed", timestamp=2.0)), retain=True)
print("ready", flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert decode_reported(seen[0], dev).online is True
        proc.kill()  # no DISCONNECT: the broker publishes the will
        proc.wait()
        while len(seen) < 2 and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        last = decode_reported(seen[-1], dev)
        assert last.online is False and last.state == "committed"
    finally:
        proc.kill()
        fleet.publish(topics.reported(), b"", retain=True)
        fleet.close()


@pytest.mark.integration
def test_clean_close_sends_no_will(mosquitto: Broker) -> None:
    topic = f"ef-will/{_id()}"
    seen: list[bytes] = []
    fleet = _transport(mosquitto)
    fleet.subscribe(topic, lambda m: seen.append(m.payload))
    dev = MqttTransport(MqttConfig(port=mosquitto.port, client_id=_id()))
    dev.set_will(topic, b"gone", retain=False)
    dev.connect()
    dev.close()
    time.sleep(0.5)
    assert seen == []
    fleet.close()


@pytest.mark.integration
def test_oversize_publish_is_refused_before_the_broker_sees_it(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "b", extra_conf="max_packet_size 20000\n")
    try:
        t = _transport(broker, max_message_bytes=64 * 1024)
        with pytest.raises(MisuseError, match="limit"):
            t.publish("a/b", b"x" * (64 * 1024 + 1))  # our own limit
        with pytest.raises(MisuseError, match="limit"):
            t.publish("a/b", b"x" * 30_000)  # the broker's Maximum Packet Size from CONNACK
        t.publish("a/b", b"x" * 10_000)
        time.sleep(0.3)
        assert t.connected and t.connects == 1  # never kicked off
        t.close()
    finally:
        broker.stop()


@pytest.mark.integration
def test_request_without_answer_times_out(mosquitto: Broker) -> None:
    t = _transport(mosquitto)
    try:
        with pytest.raises(FetchTimeoutError):
            t.request("nobody/listens", b"?", response_topic=f"resp/{_id()}", timeout=0.5)
        # an answer with matching correlation data resolves the request
        responder = _transport(mosquitto)
        responder.subscribe(
            "svc/echo",
            lambda m: responder.publish(
                m.response_topic or "", m.payload.upper(), correlation_data=m.correlation_data
            ),
        )
        time.sleep(0.2)
        answer = t.request("svc/echo", b"ping", response_topic=f"resp/{_id()}", timeout=5)
        assert answer.payload == b"PING"
        responder.close()
    finally:
        t.close()


@pytest.mark.unit
def test_config_refuses_inconsistent_settings() -> None:
    with pytest.raises(ValueError):
        MqttConfig(client_id="a/b")
    with pytest.raises(ValueError):
        MqttConfig(client_id="d", reconnect_min_s=5, reconnect_max_s=1)
    with pytest.raises(ValueError):
        MqttConfig(client_id="d", cert_file=Path("c.pem"))
    with pytest.raises(ValueError):
        MqttConfig(client_id="d", ca_file=Path("ca.pem"))
