"""Telemetry and events are acknowledged (PUBACK) only after the transaction that stored them
committed: a worker that dies, or whose flush fails, before that gets them redelivered by the
broker on its persistent session (same client id), and the (device, seq) keys store them once."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract.telemetry import decode_report
from agent.errors import MisuseError
from agent.transport import Message
from agent.transport.mqtt_client import MqttConfig, MqttTransport
from fleet.delivery.publisher import Publisher, PublisherSettings
from fleet.telemetry.ingest import TelemetryStore
from tests.support.broker import Broker
from tests.support.telemetry import encoded_reports, small_profile

pytestmark = pytest.mark.integration


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def _stored(store: TelemetryStore) -> tuple[int, int]:
    with store.database.read() as db:
        seen = int(db.scalar("SELECT COUNT(*) FROM telemetry_seen") or 0)
        merged = int(db.scalar("SELECT COALESCE(SUM(reports), 0) FROM telemetry_windows") or 0)
    return seen, merged


def _worker(broker: Broker, client_id: str, prefix: str, tmp: Path, store: TelemetryStore,
            flush: Callable[[], object]) -> Publisher:
    config = MqttConfig(host=broker.host, port=broker.port, client_id=client_id, manual_ack=True)
    pub = Publisher(config, prefix, tmp, PublisherSettings(serve_requests=False, ack_after_s=0.05))
    pub.on_telemetry(lambda _device, payload: store.ingest(payload), flush=flush)
    pub.start()
    return pub


def test_a_report_is_acknowledged_only_after_its_flush_committed(mosquitto: Broker, tmp_path: Path) -> None:
    prefix, client_id = f"ack-{secrets.token_hex(4)}", f"ack-worker-{secrets.token_hex(4)}"
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=5, shifts=[0.0], rows=10)
    first = TelemetryStore(tmp_path / "telemetry.db")
    attempts = []

    def failing_flush() -> None:
        attempts.append(1)
        raise RuntimeError("database away")

    pub = _worker(mosquitto, client_id, prefix, tmp_path, first, failing_flush)
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ack-sender-{secrets.token_hex(4)}",
                         protocol=mqtt.MQTTv5)
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    try:
        for r in reports:
            topic = f"{prefix}/v1/devices/{decode_report(r).device_id}/telemetry"
            sender.publish(topic, r, qos=1).wait_for_publish(10)
        assert _wait(lambda: first.counters.accepted == len(reports) and len(attempts) >= 2)
        assert pub._ack_window() == 16  # Mosquitto's default window of 20, minus a margin
        pub.stop()  # the flush never committed: nothing was acknowledged
        assert _stored(first) == (0, 0)
        first.database.close()  # dies with its batch unflushed

        second = TelemetryStore(tmp_path / "telemetry.db")
        pub = _worker(mosquitto, client_id, prefix, tmp_path, second, second.flush)
        assert _wait(lambda: _stored(second) == (len(reports), len(reports)))  # redelivered, stored
        assert _wait(lambda: pub.ack_flushes >= 1 and not pub._unacked)
        pub.stop()
        second.close()

        third = TelemetryStore(tmp_path / "telemetry.db")
        pub = _worker(mosquitto, client_id, prefix, tmp_path, third, third.flush)
        time.sleep(1.5)
        assert pub.transport.messages_in == 0  # acknowledged once stored: no redelivery
        assert _stored(third) == (len(reports), len(reports))
        pub.stop()
        third.close()
    finally:
        sender.loop_stop()
        sender.disconnect()


def test_an_acknowledgement_of_an_earlier_connection_is_not_sent(mosquitto: Broker) -> None:
    client_id = f"ack-stale-{secrets.token_hex(4)}"
    topic = f"ack-stale/{secrets.token_hex(4)}"
    got: list[Message] = []
    transport = MqttTransport(MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id=client_id,
                                         manual_ack=True))
    transport.subscribe(topic, got.append, manual_ack=True)
    transport.connect()
    sender = MqttTransport(MqttConfig(host=mosquitto.host, port=mosquitto.port,
                                      client_id=f"ack-stale-s-{secrets.token_hex(4)}"))
    sender.connect()
    try:
        sender.publish(topic, b"one", qos=1).wait_for_publish(10)
        assert _wait(lambda: len(got) == 1)
        old = got[0].ack_token
        assert old is not None
        transport._client.disconnect()  # the link drops; the supervisor reconnects, same session
        assert _wait(lambda: len(got) == 2)  # unacknowledged: redelivered on the new connection
        assert transport.ack(old) is False  # an old packet id would confirm another message
        new = got[1].ack_token
        assert new is not None and new[0] > old[0]
        assert transport.ack(new) is True
    finally:
        sender.close()
        transport.close()


def test_a_manual_ack_subscription_needs_a_manual_ack_transport(mosquitto: Broker) -> None:
    transport = MqttTransport(MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="ack-misuse"))
    with pytest.raises(MisuseError):
        transport.subscribe("x/#", lambda _m: None, manual_ack=True)
