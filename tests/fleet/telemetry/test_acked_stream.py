"""Telemetry is acknowledged (PUBACK) only after the flush that stored it, on a connection of its
own: a failing flush leaves reports unacknowledged and the broker redelivers them to the same
client id; held acknowledgements never exceed the window the stream announces; and reported
states and events on the publisher's connection keep flowing while a flush hangs."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.contract.protocol import Event, ReportedState, encode_event, encode_reported
from agent.contract.telemetry_codec import decode_report
from agent.transport import Message
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.acked_transport import AckedTransport, AckToken
from fleet.delivery.publisher import Publisher, PublisherSettings
from fleet.errors import FleetMisuseError
from fleet.telemetry.acked_stream import StreamSettings, TelemetryStream
from fleet.telemetry.ingest import TelemetryStore
from tests.support.broker import Broker
from tests.support.telemetry import encoded_reports, small_profile, stored_reports

pytestmark = pytest.mark.integration


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def _stream(
    broker: Broker,
    client_id: str,
    prefix: str,
    store: TelemetryStore,
    flush: Callable[[], object],
    settings: StreamSettings | None = None,
) -> TelemetryStream:
    config = MqttConfig(host=broker.host, port=broker.port, client_id=client_id)
    stream = TelemetryStream(
        config,
        prefix,
        None,
        lambda _device, payload: store.ingest(payload),
        flush,
        settings or StreamSettings(flush_after_s=0.05, retry_s=0.1),
    )
    stream.start()
    return stream


def _sender(broker: Broker) -> MqttTransport:
    sender = MqttTransport(
        MqttConfig(
            host=broker.host, port=broker.port, client_id=f"sender-{secrets.token_hex(4)}", max_inflight=200
        )
    )
    sender.connect()
    return sender


def _send(sender: MqttTransport, prefix: str, reports: list[bytes]) -> None:
    sent = [
        sender.publish(f"{prefix}/v1/devices/{decode_report(r).device_id}/telemetry", r, qos=1)
        for r in reports
    ]
    for info in sent:
        info.wait_for_publish(10)


def test_a_failing_flush_leaves_reports_unacknowledged_and_redelivered(
    mosquitto: Broker, tmp_path: Path
) -> None:
    prefix, client_id = f"acked-{secrets.token_hex(4)}", f"acked-{secrets.token_hex(4)}"
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=5, shifts=[0.0], rows=10)
    first = TelemetryStore(tmp_path / "telemetry.db")

    def failing_flush() -> None:
        raise RuntimeError("database away")

    stream = _stream(mosquitto, client_id, prefix, first, failing_flush)
    sender = _sender(mosquitto)
    try:
        _send(sender, prefix, reports)
        assert _wait(lambda: first.counters.accepted == len(reports) and stream.flush_failures >= 2)
        stream.stop()  # the final flush fails too: nothing was acknowledged
        assert stream.transport.acks_sent == 0
        assert stored_reports(first.database) == (0, 0)
        first.database.close()  # the worker dies with its batch unflushed

        second = TelemetryStore(tmp_path / "telemetry.db")
        stream = _stream(mosquitto, client_id, prefix, second, second.flush)
        assert _wait(lambda: stored_reports(second.database) == (len(reports), len(reports)))
        assert _wait(lambda: stream.held == 0 and stream.transport.acks_sent == len(reports))
        stream.stop()
        second.close()

        third = TelemetryStore(tmp_path / "telemetry.db")
        stream = _stream(mosquitto, client_id, prefix, third, third.flush)
        time.sleep(1.0)
        assert stream.transport.messages_in == 0  # acknowledged once stored: nothing redelivered
        assert stored_reports(third.database) == (len(reports), len(reports))  # once each
        stream.stop()
        third.close()
    finally:
        sender.close()


def test_control_messages_flow_while_a_flush_hangs(mosquitto: Broker, tmp_path: Path) -> None:
    """The stream's window (20 here) fills while its flush hangs, which stops telemetry to it;
    the publisher's connection, with reported states and events, does not notice."""
    prefix = f"ctl-{secrets.token_hex(4)}"
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=20, shifts=[0.0] * 5, rows=5)
    store = TelemetryStore(tmp_path / "telemetry.db")
    release = threading.Event()
    flushes: list[int] = []

    def hanging_flush() -> None:
        flushes.append(1)
        release.wait(30)
        store.flush()

    window = StreamSettings(window=20, flush_at=10, flush_after_s=0.05, retry_s=0.1)
    stream = _stream(mosquitto, f"ctl-t-{secrets.token_hex(4)}", prefix, store, hanging_flush, window)
    events: list[tuple[str, int]] = []
    states: list[str] = []
    pub = Publisher(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id=f"ctl-{secrets.token_hex(4)}"),
        prefix,
        tmp_path,
        PublisherSettings(serve_requests=False),
    )
    pub.on_event(lambda device, event: events.append((device, event.seq)))
    pub.on_reported(lambda device, _state: states.append(device))
    pub.start()
    sender = _sender(mosquitto)
    try:
        feeder = threading.Thread(target=_send, args=(sender, prefix, reports), daemon=True)
        feeder.start()
        # the flush began at 10 held and hangs; the broker sent 10 more, then stopped: window full
        assert _wait(lambda: stream.transport.messages_in == 20 and len(flushes) == 1)
        for i in range(20):
            sender.publish(f"{prefix}/v1/devices/dev-{i}/events", _event(i), qos=1)
            sender.publish(f"{prefix}/v1/devices/dev-{i}/reported", _reported(), qos=1)
        assert _wait(lambda: len(events) == 20 and len(states) == 20, timeout=10)  # while it hangs
        assert not release.is_set() and len(flushes) == 1
        assert stream.transport.messages_in == 20  # nothing past the window
        release.set()
        feeder.join(30)
        assert _wait(lambda: stored_reports(store.database) == (len(reports), len(reports)), timeout=30)
        assert stream.max_held <= 20
    finally:
        release.set()
        sender.close()
        pub.stop()
        stream.stop()
        store.close()


def _event(seq: int) -> bytes:
    return encode_event(Event(type="update.started", timestamp=time.time(), seq=seq))


def _reported() -> bytes:
    return encode_reported(ReportedState(agent_version="1", timestamp=time.time()))


def test_an_acknowledgement_of_an_earlier_connection_is_not_sent(mosquitto: Broker) -> None:
    topic = f"acked-stale/{secrets.token_hex(4)}"
    got: list[tuple[Message, AckToken | None]] = []
    transport = AckedTransport(
        MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id=f"acked-stale-{secrets.token_hex(4)}"),
        receive_maximum=5,
    )
    transport.subscribe_acked(topic, lambda m, t: got.append((m, t)))
    transport.connect()
    sender = _sender(mosquitto)
    try:
        sender.publish(topic, b"one", qos=1).wait_for_publish(10)
        assert _wait(lambda: len(got) == 1)
        old = got[0][1]
        assert old is not None
        transport._client.disconnect()  # the link drops; the supervisor reconnects, same session
        assert _wait(lambda: len(got) == 2)  # unacknowledged: redelivered on the new connection
        assert got[1][0].payload == b"one"
        assert transport.ack(old) is False and transport.stale_acks == 1
        new = got[1][1]
        assert new is not None and new[0] > old[0]
        assert transport.ack(new) is True
    finally:
        sender.close()
        transport.close()


def test_stream_settings_keep_the_flush_inside_the_window() -> None:
    with pytest.raises(FleetMisuseError):
        StreamSettings(window=100, flush_at=101)
    with pytest.raises(FleetMisuseError):
        StreamSettings(window=70_000, flush_at=10)
    with pytest.raises(FleetMisuseError):
        StreamSettings(flush_after_s=0)
