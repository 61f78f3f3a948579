"""A graceful stop of a share-group member's acked stream, on a real Mosquitto: what the broker
does when a session ends (the premise), the drain that hands the member's share to the other
member with nothing lost, and the fallback that keeps the session when the drain cannot finish.

The premise, measured on Mosquitto 2.0.11 (fleet/delivery/acked_stream.py): a member that ends
its session (DISCONNECT, Session Expiry 0) while holding unacknowledged messages and with more
queued for it loses them all; the other member never gets them."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.contract.telemetry_codec import decode_report
from agent.transport import Message
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.acked_stream import StreamSettings
from fleet.delivery.acked_transport import AckedTransport, AckToken
from fleet.telemetry.acked_stream import TelemetryStream
from fleet.telemetry.ingest import TelemetryStore
from tests.support.broker import Broker
from tests.support.telemetry import encoded_reports, small_profile, stored_reports

pytestmark = pytest.mark.integration
ENDING = StreamSettings(window=50, flush_at=25, flush_after_s=0.05, retry_s=0.1, end_session=True,
                        drain_quiet_s=0.3, drain_timeout_s=3.0)


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def _config(broker: Broker, client_id: str) -> MqttConfig:
    return MqttConfig(host=broker.host, port=broker.port, client_id=client_id)


def _sender(broker: Broker) -> MqttTransport:
    sender = MqttTransport(MqttConfig(host=broker.host, port=broker.port,
                                      client_id=f"end-sender-{secrets.token_hex(4)}", max_inflight=200))
    sender.connect()
    return sender


def _session_present(broker: Broker, client_id: str) -> bool:
    """Connect as `client_id` resuming its session, if any (then drop it: clean close, expiry 0)."""
    probe = MqttTransport(MqttConfig(host=broker.host, port=broker.port, client_id=client_id,
                                     session_expiry_s=0))
    present: list[bool] = []
    probe.add_on_connect(present.append)
    probe.connect(10)
    probe.close()
    return present[0]


def test_mosquitto_drops_what_an_ended_session_held_or_had_queued(mosquitto: Broker) -> None:
    """Why the stream unsubscribes and drains before it ends its session."""
    group, topic = f"g{secrets.token_hex(3)}", f"end-premise/{secrets.token_hex(4)}"
    flt = f"$share/{group}/{topic}"
    held: list[tuple[Message, AckToken | None]] = []
    holder = AckedTransport(_config(mosquitto, f"end-a-{secrets.token_hex(4)}"), receive_maximum=10)
    holder.subscribe_acked(flt, lambda m, t: held.append((m, t)))  # never acknowledges
    other: list[bytes] = []
    taker = MqttTransport(_config(mosquitto, f"end-b-{secrets.token_hex(4)}"))
    taker.subscribe(flt, lambda m: other.append(m.payload))
    holder.connect(10)
    taker.connect(10)
    sender = _sender(mosquitto)
    try:
        for info in [sender.publish(topic, str(i).encode(), qos=1) for i in range(100)]:
            info.wait_for_publish(10)
        assert _wait(lambda: len(held) == 10 and len(other) == 50)  # 10 in flight, 40 queued for it
        assert holder.end_session()
        time.sleep(1.0)
        assert len(other) == 50  # the 50 of the ended session went nowhere
    finally:
        sender.close()
        holder.close()
        taker.close()


def test_a_stopped_member_drains_its_share_and_ends_its_session(mosquitto: Broker, tmp_path: Path) -> None:
    prefix, group = f"end-{secrets.token_hex(4)}", f"g{secrets.token_hex(3)}"
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=50, shifts=[0.0] * 8, rows=5)
    stores = [TelemetryStore(tmp_path / "telemetry.db") for _ in range(2)]
    streams = [TelemetryStream(_config(mosquitto, f"end-{i}-{secrets.token_hex(4)}"), prefix, group,
                               lambda _d, payload, s=s: s.ingest(payload), s.flush, ENDING)
               for i, s in enumerate(stores)]
    for stream in streams:
        stream.start()
    sender = _sender(mosquitto)

    def send() -> None:
        for r in reports:
            sender.publish(f"{prefix}/v1/devices/{decode_report(r).device_id}/telemetry", r,
                           qos=1).wait_for_publish(10)

    feeder = threading.Thread(target=send, daemon=True)
    try:
        feeder.start()
        assert _wait(lambda: streams[0].transport.acks_sent >= 50)
        streams[0].stop()  # mid-stream, for good
        assert streams[0].session_ended and streams[0].held == 0
        assert streams[0].transport.acks_sent == streams[0].transport.messages_in  # all it got, stored
        feeder.join(60)
        assert _wait(lambda: stored_reports(stores[1].database) == (len(reports), len(reports)), timeout=30)
        assert not _session_present(mosquitto, streams[0].transport.config.client_id)
    finally:
        sender.close()
        for stream in streams:
            stream.stop()
        for store in stores:
            store.close()


def test_a_stream_that_cannot_drain_keeps_its_session_for_the_next_start(mosquitto: Broker,
                                                                          tmp_path: Path) -> None:
    prefix, client_id = f"end-keep-{secrets.token_hex(4)}", f"end-keep-{secrets.token_hex(4)}"
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=5, shifts=[0.0], rows=5)
    store = TelemetryStore(tmp_path / "telemetry.db")

    def failing_flush() -> None:
        raise RuntimeError("database away")

    stream = TelemetryStream(_config(mosquitto, client_id), prefix, f"g{secrets.token_hex(3)}",
                             lambda _d, payload: store.ingest(payload), failing_flush, ENDING)
    stream.start()
    sender = _sender(mosquitto)
    try:
        for info in [sender.publish(f"{prefix}/v1/devices/{decode_report(r).device_id}/telemetry", r, qos=1)
                     for r in reports]:
            info.wait_for_publish(10)
        assert _wait(lambda: stream.transport.messages_in == len(reports))
        stream.stop()  # the drain gives up after drain_timeout_s: nothing acknowledged
        assert not stream.session_ended and stream.transport.acks_sent == 0
        store.database.close()

        second = TelemetryStore(tmp_path / "telemetry.db")
        stream = TelemetryStream(_config(mosquitto, client_id), prefix, None,
                                 lambda _d, payload: second.ingest(payload), second.flush, ENDING)
        stream.start()  # the slot again: its session, with the held reports, is still there
        assert _wait(lambda: stored_reports(second.database) == (len(reports), len(reports)))
        stream.stop()
        second.close()
    finally:
        sender.close()
