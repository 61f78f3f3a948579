"""Two ingest workers on a real Mosquitto, one telemetry database: the `$share` subscription
splits the reports between them, and a report a device sends twice (its outbox resends what the
broker never acknowledged) is stored once even when the copies reach different workers."""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract.telemetry_codec import decode_report
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.publisher import Publisher, PublisherSettings
from fleet.devices.enrollment import mosquitto_password_hash
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from tests.support.broker import Broker
from tests.support.packaged_broker import FLEET_PW, start_packaged_broker
from tests.support.telemetry import T0, encoded_reports, small_profile

PREFIX = "edgefleet"


def _worker(broker: Broker, name: str, db: Path, repo: Path) -> tuple[Publisher, TelemetryStore]:
    store = TelemetryStore(db, IngestConfig(window_s=60.0, flush_every=50), clock=lambda: T0 + 10_000)
    pub = Publisher(MqttConfig(host=broker.host, port=broker.port, client_id=name), PREFIX, repo,
                    PublisherSettings(serve_requests=False, ingest_share_group="edgefleet-ingest"))
    pub.on_telemetry(lambda device, payload: store.ingest(payload))
    pub.start()
    return pub, store


@pytest.mark.integration
def test_two_workers_split_the_reports_and_store_each_once(mosquitto: Broker, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    db = tmp_path / "telemetry.db"
    workers = [_worker(mosquitto, f"ingest-{i}", db, repo) for i in range(2)]
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=100, shifts=[0.0, 0.0], rows=50)
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sender", protocol=mqtt.MQTTv5)
    device.connect(mosquitto.host, mosquitto.port)
    device.loop_start()
    try:
        sent = [device.publish(f"{PREFIX}/v1/devices/{decode_report(r).device_id}/telemetry", r, qos=1)
                for r in reports + reports]  # every report twice
        for info in sent:
            info.wait_for_publish(10)

        def seen() -> int:
            return sum(s.counters.accepted + s.counters.duplicates for _, s in workers)

        deadline = time.monotonic() + 60
        while seen() < 2 * len(reports) and time.monotonic() < deadline:
            time.sleep(0.05)
        for _, store in workers:
            store.flush()
        got = [(s.counters.accepted, s.counters.duplicates) for _, s in workers]
        assert sum(a + d for a, d in got) == 2 * len(reports)  # each copy handled by exactly one worker
        assert all(a > 0 for a, _ in got)  # the broker split the load
        assert sum(a for a, _ in got) == len(reports)  # and each report was stored once
        windows = workers[0][1].windows("m", "1")
        assert sum(int(w["reports"]) for w in windows) == len(reports)  # type: ignore[call-overload]
    finally:
        device.loop_stop()
        device.disconnect()
        for pub, store in workers:
            pub.stop()
            store.close()


@pytest.mark.integration
def test_the_packaged_acl_lets_the_fleet_user_share_device_topics(tmp_path: Path) -> None:
    """Mosquitto checks a `$share/<group>/<filter>` subscription against `<filter>`, so the
    packaged `topic readwrite edgefleet/#` covers every share group; a device is still refused."""
    passwd = tmp_path / "devices.passwd"
    passwd.write_text(f"dev1:{mosquitto_password_hash('pw-dev')}\n")
    broker = start_packaged_broker(tmp_path / "broker", passwd)
    got: list[str] = []
    clients = []
    try:
        logins = (("fleet", FLEET_PW, broker.fleet_port), ("dev1", "pw-dev", broker.device_port))
        for user, pw, port in logins:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
            c.username_pw_set(user, pw)
            c.on_message = lambda c, u, m, who=user: got.append(f"{who}:{m.topic}")
            c.connect("127.0.0.1", port)
            c.loop_start()
            clients.append(c)
        fleet, dev = clients
        grants: list[list[int]] = []
        for c in clients:
            c.on_subscribe = lambda c, u, mid, rcs, p: grants.append([int(rc.value) for rc in rcs])
        fleet.subscribe(f"$share/edgefleet-ingest/{PREFIX}/v1/devices/+/telemetry", qos=1)
        dev.subscribe(f"$share/x/{PREFIX}/v1/devices/+/telemetry", qos=1)  # another device's data
        deadline = time.monotonic() + 10
        while len(grants) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        dev.publish(f"{PREFIX}/v1/devices/dev1/telemetry", b"r", qos=1).wait_for_publish(10)
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert got == [f"fleet:{PREFIX}/v1/devices/dev1/telemetry"]  # only the fleet user receives it
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        broker.proc.terminate()
        broker.proc.wait(10)
