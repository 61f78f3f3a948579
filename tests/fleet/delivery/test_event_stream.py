"""Lifecycle events on their own acked stream (fleet/delivery/event_stream.py), on a real Mosquitto:
an event is acknowledged only after the transaction that stored it, so a failed store acknowledges
nothing and the broker redelivers it (signed, its counter already claimed: the gate lets the
redelivery on, the (device, seq) key stores it once); unsigned events are refused as before; and
events keep flowing while a telemetry flush hangs with its window full."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.contract.protocol import Event, Topics, encode_event
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.acked_stream import AckedStream, StreamSettings
from fleet.delivery.event_log import EventBatch, EventLog
from fleet.delivery.event_stream import EventStream
from fleet.delivery.malformed import MalformedLog
from fleet.delivery.report_verify import ReportVerifier
from fleet.metrics import FleetMetrics, MetricSources
from fleet.store import Store
from fleet.telemetry.acked_stream import TelemetryStream
from fleet.telemetry.ingest import TelemetryStore
from tests.support.broker import Broker
from tests.support.report_signing import DeviceKey, enroll_keys
from tests.support.telemetry import encoded_reports, small_profile, stored_reports

pytestmark = pytest.mark.integration
LOG = logging.getLogger("edgefleet.test.events")
FAST = StreamSettings(window=100, flush_at=50, flush_after_s=0.02, retry_s=0.1)


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def _stored(store: Store) -> list[tuple[str, int]]:
    with store.read() as db:
        return [(str(d), int(s)) for d, s in db.execute(
            "SELECT device_id, seq FROM device_events ORDER BY device_id, seq").fetchall()]


def _stream(broker: Broker, client_id: str, prefix: str, store: Store, gate: ReportVerifier,
            flush: Callable[[], object] | None = None) -> tuple[EventStream, EventBatch]:
    batch = EventBatch(EventLog(store))
    stream = EventStream(MqttConfig(host=broker.host, port=broker.port, client_id=client_id), prefix, None,
                         batch.add, flush or batch.flush, MalformedLog(LOG), FAST,
                         check=lambda msg: gate(msg, redelivery=True))
    stream.start()
    return stream, batch


def _scrape(store: Store, *streams: AckedStream) -> dict[tuple[str, str], float]:
    """The acked streams' samples of one /metrics rendering, by (name, stream label)."""
    text = FleetMetrics(lambda api: MetricSources(store=store, api=api, streams=streams)).render().decode()
    return {(s.name, s.labels["stream"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("edgefleet_ingest_stream_")}


def _sender(broker: Broker) -> MqttTransport:
    sender = MqttTransport(MqttConfig(host=broker.host, port=broker.port,
                                      client_id=f"ev-sender-{secrets.token_hex(4)}", max_inflight=200))
    sender.connect()
    return sender


def _send_events(sender: MqttTransport, prefix: str, keys: dict[str, DeviceKey], seqs: range,
                 signed: bool = True) -> None:
    sent = []
    for dev, key in keys.items():
        for seq in seqs:
            payload = encode_event(Event(type="director_accepted", timestamp=time.time(), seq=seq))
            props = key.props("events", payload) if signed else ()
            sent.append(sender.publish(Topics(prefix, dev).events(), payload, qos=1, user_properties=props))
    for info in sent:
        info.wait_for_publish(10)


def test_a_failed_event_store_acknowledges_nothing_and_the_redelivery_is_stored_once(
        mosquitto: Broker, tmp_path: Path) -> None:
    prefix, client_id = f"ev-{secrets.token_hex(4)}", f"ev-{secrets.token_hex(4)}"
    store = Store(tmp_path / "fleet.db")
    keys = enroll_keys(store, ["dev-a", "dev-b"])
    gate = ReportVerifier(store.report_keys, prefix)
    failures: list[int] = []

    def failing_flush() -> None:
        failures.append(1)
        raise RuntimeError("database away")

    stream, _ = _stream(mosquitto, client_id, prefix, store, gate, failing_flush)
    sender = _sender(mosquitto)
    try:
        _send_events(sender, prefix, keys, range(10))
        _send_events(sender, prefix, {"dev-a": keys["dev-a"]}, range(10, 12), signed=False)  # refused
        assert _wait(lambda: stream.transport.messages_in == 22 and len(failures) >= 2)
        scrape = _scrape(store, stream)
        assert scrape[("edgefleet_ingest_stream_held", "events")] == 22  # every one held, none acked
        assert scrape[("edgefleet_ingest_stream_flush_failures_total", "events")] >= 2
        assert scrape[("edgefleet_ingest_stream_acks_total", "events")] == 0
        stream.stop()  # the worker stops (or dies) with its batch unstored: nothing was acknowledged
        assert stream.transport.acks_sent == 0 and stream.flush_failures >= 2
        assert _stored(store) == [] and not stream.session_ended
        assert gate.refused()[("events", "unsigned")] == 2

        stream, _ = _stream(mosquitto, client_id, prefix, store, gate)  # the slot starts again
        want = [(dev, seq) for dev in ("dev-a", "dev-b") for seq in range(10)]
        assert _wait(lambda: _stored(store) == want)  # redelivered, counters claimed: let on, once each
        assert _wait(lambda: stream.held == 0 and stream.transport.acks_sent == 22)  # refused ones too
        assert gate.refused()[("events", "unsigned")] == 4  # the unsigned pair came back, refused again
        stream.stop()

        stream, _ = _stream(mosquitto, client_id, prefix, store, gate)
        time.sleep(1.0)
        assert stream.transport.messages_in == 0  # acknowledged once stored: nothing redelivered
        assert _stored(store) == want
        assert gate.refused()[("events", "unsigned")] == 4
        stream.stop()
    finally:
        sender.close()
        store.close()


def test_events_flow_while_a_telemetry_flush_hangs(mosquitto: Broker, tmp_path: Path) -> None:
    prefix = f"ev-hang-{secrets.token_hex(4)}"
    store = Store(tmp_path / "fleet.db")
    keys = enroll_keys(store, [f"dev-{i}" for i in range(10)])
    gate = ReportVerifier(store.report_keys, prefix)
    telemetry = TelemetryStore(tmp_path / "telemetry.db")
    release = threading.Event()
    flushes: list[int] = []

    def hanging_flush() -> None:
        flushes.append(1)
        release.wait(30)
        telemetry.flush()

    window = StreamSettings(window=20, flush_at=10, flush_after_s=0.05, retry_s=0.1)
    tele = TelemetryStream(MqttConfig(host=mosquitto.host, port=mosquitto.port,
                                      client_id=f"ev-hang-t-{secrets.token_hex(4)}"), prefix, None,
                           lambda _device, payload: telemetry.ingest(payload), hanging_flush, window)
    tele.start()
    events, _ = _stream(mosquitto, f"ev-hang-e-{secrets.token_hex(4)}", prefix, store, gate)
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=20, shifts=[0.0] * 3, rows=5)
    sender = _sender(mosquitto)
    try:
        topic = f"{prefix}/v1/devices/dev-t/telemetry"
        feeder = threading.Thread(target=lambda: [sender.publish(topic, r, qos=1).wait_for_publish(30)
                                                  for r in reports], daemon=True)
        feeder.start()
        assert _wait(lambda: tele.transport.messages_in == 20 and len(flushes) == 1)  # window full, hanging
        _send_events(sender, prefix, keys, range(5))
        assert _wait(lambda: len(_stored(store)) == 50, timeout=10)  # stored (and acked) while it hangs
        assert _wait(lambda: events.transport.acks_sent == 50, timeout=10)
        assert not release.is_set() and tele.transport.messages_in == 20
        release.set()
        feeder.join(30)
        assert _wait(lambda: stored_reports(telemetry.database)[0] == len(reports), timeout=30)
    finally:
        release.set()
        sender.close()
        events.stop()
        tele.stop()
        telemetry.close()
        store.close()
