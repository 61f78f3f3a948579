"""Load devices against a real fleet and Mosquitto: 200 of them on one selector loop follow a
canary 10/50/100 % to the end, each device assigned and committed exactly once; a device's
parsing refuses stale, foreign and malformed documents."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.contract.protocol import Topics
from agent.contract.telemetry_codec import decode_report
from fleet.components import ServeConfig, build_components
from fleet.service import FleetService
from fleet.settings import FleetSettings
from simulators.load_devices.device import LoadDevice
from simulators.load_devices.fleet_setup import (
    device_ids,
    online_count,
    publish_versions,
    register_devices,
)
from simulators.load_devices.loop import LoadFleet
from tests.support.broker import Broker, free_port
from tests.support.telemetry import encoded_reports, small_profile

STRATEGY = {"kind": "canary", "stages": [10, 50, 100], "bake_s": 0, "device_timeout_s": 120}


def _settings(tmp: Path, broker: Broker) -> FleetSettings:
    return FleetSettings(data_dir=tmp / "fleet", port=free_port(), broker_url=broker.url,
                         device_broker_url=broker.url)


@pytest.mark.integration
@pytest.mark.slow
def test_two_hundred_load_devices_follow_a_canary_to_the_end(mosquitto: Broker, tmp_path: Path) -> None:
    settings = _settings(tmp_path, mosquitto)
    cfg = ServeConfig(controller_tick_s=0.2, root_keys=1, root_threshold=1)
    service = FleetService(settings, component_factory=lambda store: build_components(
        settings, store, with_broker=True, config=cfg))
    ids = device_ids(200)
    v1, v2 = publish_versions(settings, service.store, tmp_path / "bundles")
    register_devices(service.store, ids)
    service.start_background()
    fleet = LoadFleet(mosquitto.host, mosquitto.port, settings.topic_prefix, ids, active="loadmlp-1.0.0",
                      install_s=0.1)
    fleet.start()
    try:
        assert fleet.wait_connected(60)
        deadline = time.monotonic() + 60  # the reported states reach the inventory
        while time.monotonic() < deadline and online_count(service.store) < len(ids):
            time.sleep(0.1)
        rid = service.store.rollouts.create(v2, "env=load", STRATEGY, {}, "op").id
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and service.store.rollouts.get(rid).state.value != "completed":
            time.sleep(0.2)
        assert service.store.rollouts.get(rid).state.value == "completed"
        assert all(d.applied == ["loadmlp-2.0.0"] for d in fleet.devices)  # each committed once
        with service.store.read() as db:
            rows = [tuple(r) for r in db.execute(
                "SELECT outcome, COUNT(*) FROM rollout_progress WHERE rollout_id = :id GROUP BY outcome",
                {"id": rid}).fetchall()]
            events = db.execute("SELECT COUNT(*), COUNT(handled_at) FROM device_events").fetchone()
        assert rows == [("succeeded", len(ids))]
        assert events[0] == events[1] >= 2 * len(ids)  # accepted + committed, each stored and applied once
        assert not any(d.outbox for d in fleet.devices)  # every event acknowledged by the broker
        assert v1 != v2
    finally:
        fleet.stop()
        service.stop()


@pytest.mark.unit
def test_a_load_device_refuses_stale_foreign_and_malformed_documents() -> None:
    dev = LoadDevice("load-00001", Topics("edgefleet"), active="m-1")

    def doc(seq: int, device: str = "load-00001", version: str = "2") -> bytes:
        signed = {"schema_version": 1, "device_id": device, "sequence": seq,
                  "issued_at": "2026-01-01T00:00:00Z", "expires": "2027-01-01T00:00:00Z",
                  "target": {"path": f"m-{version}.efb", "length": 1, "sha256": "0" * 64,
                             "name": "m", "version": version}}
        return json.dumps({"signed": signed, "signatures": []}).encode()

    assert dev.on_director(b"{not json", 0.0) == [] and dev.refused == 1
    assert dev.on_director(doc(1, device="load-00002"), 0.0) == [] and dev.refused == 2
    out = dev.on_director(doc(5), 0.0)
    assert [o.topic.rsplit("/", 1)[1] for o in out] == ["events", "reported"] and dev.state == "downloading"
    assert dev.on_director(doc(5), 0.0) == [] and dev.refused == 3  # replayed sequence
    assert dev.due(0.05) == []  # still installing
    done = dev.due(1.0)
    assert dev.active == "m-2" and dev.previous == "m-1" and dev.applied == ["m-2"] and len(done) == 3
    assert set(dev.outbox) == {0, 1}  # accepted + committed wait for their PUBACK
    dev.acked(0)
    assert set(dev.outbox) == {1}


@pytest.mark.unit
def test_a_load_device_sends_telemetry_with_the_agents_encoder_and_keeps_it_until_acked() -> None:
    payload = encoded_reports(small_profile(), "m", "1", "c", devices=1, shifts=[0.0], rows=20)[0]
    template = decode_report(payload)
    dev = LoadDevice("load-00007", Topics("edgefleet"), active="m-1")
    out = [dev.telemetry(template, 1000.0 + i, 60.0) for i in range(2)]
    reports = [decode_report(o.payload) for o in out]
    assert [(r.device_id, r.seq) for r in reports] == [("load-00007", 0), ("load-00007", 1)]
    assert reports[1].interval_end == 1001.0 and out[0].topic == "edgefleet/v1/devices/load-00007/telemetry"
    assert set(dev.outbox) == {0, 1}
    dev.acked(1)
    assert set(dev.outbox) == {0}  # resent with the same seq on the next connect
