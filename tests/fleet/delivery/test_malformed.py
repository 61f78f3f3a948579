"""Malformed reported states, events and requests from a device: counted in /metrics, logged
with a rate limit (one line per kind per interval, carrying the suppressed count)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.contract.protocol import Topics
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.malformed import MalformedLog
from fleet.delivery.publisher import Publisher
from fleet.metrics import FleetMetrics, MetricSources
from fleet.store import Store
from tests.support.broker import Broker
from tests.support.fakes import FakeClock

PREFIX = "ef-malformed"
GARBAGE = 3000


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        done.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.unit
def test_one_line_per_kind_per_interval_with_the_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = MalformedLog(logging.getLogger("edgefleet.test.malformed"), interval_s=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="edgefleet.test.malformed")
    for _ in range(5):
        log.note("report", "not msgpack", device="d1")
    log.note("event", "bad seq", device="d1")
    clock.advance(10.5)
    log.note("report", "not msgpack", device="d2")
    lines = [(r.getMessage(), r.__dict__["suppressed"], r.__dict__["total"]) for r in caplog.records]
    assert lines == [("publisher.bad_report", 0, 1), ("publisher.bad_event", 0, 1),
                     ("publisher.bad_report", 4, 6)]
    assert log.counts() == {"event": 1, "report": 6, "request": 0}


@pytest.mark.integration
def test_garbage_over_mqtt_is_counted_in_metrics_and_barely_logged(
        mosquitto: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fleet.delivery.publisher")
    pub = Publisher(MqttConfig(port=mosquitto.port, client_id="pub-malformed"), PREFIX, tmp_path / "repo")
    got: list[str] = []
    pub.on_reported(lambda dev, st: got.append(dev))
    pub.on_event(lambda dev, ev: got.append(dev))
    pub.start()
    device = MqttTransport(MqttConfig(port=mosquitto.port, client_id="garbage-dev"))
    device.connect()
    topics = Topics(PREFIX, "garbage-dev")
    try:
        for i in range(GARBAGE):
            device.publish(topics.reported() if i % 2 else topics.events(), b"\xc1 not msgpack %d" % i)
        _wait(lambda: sum(pub.malformed.counts().values()) >= GARBAGE, "the publisher to see the garbage")
    finally:
        device.close()
        pub.stop()
    assert got == []
    assert pub.malformed.counts() == {"event": GARBAGE // 2, "report": GARBAGE // 2, "request": 0}
    lines = [r for r in caplog.records if r.getMessage().startswith("publisher.bad_")]
    assert 2 <= len(lines) <= 4  # the first of each kind (and one more if the run crossed an interval)
    store = Store(tmp_path / "fleet.db")
    try:
        text = FleetMetrics(lambda api: MetricSources(store=store, publisher=pub, api=api)).render().decode()
    finally:
        store.close()
    samples = {(s.name, s.labels.get("kind")): s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "edgefleet_mqtt_malformed_total"}
    assert samples == {("edgefleet_mqtt_malformed_total", "event"): GARBAGE // 2,
                       ("edgefleet_mqtt_malformed_total", "report"): GARBAGE // 2,
                       ("edgefleet_mqtt_malformed_total", "request"): 0}
