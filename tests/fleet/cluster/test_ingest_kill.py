"""An ingest worker killed with SIGKILL mid-stream loses nothing: it acknowledges a report or an
event only after the transaction that stored it committed (fleet/delivery/acked_stream.py), so
what it had received but not stored is redelivered to its session when it starts again in its
slot (same host and port, so the same client ids), and the (device, seq) keys store each once.
(Acknowledged on arrival, as before, runs of the telemetry test stored 1,582 and 1,695 of the
2,000.)"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import pytest

from agent.contract.protocol import Event, encode_event
from agent.contract.telemetry_codec import decode_report
from fleet.db.database import Database
from fleet.store import Store
from simulators.load_devices.scale_run import serve_process, stop_processes
from tests.support.broker import Broker, free_port
from tests.support.report_signing import enroll_keys
from tests.support.signed_sender import SignedSender, wait_until
from tests.support.telemetry import encoded_reports, small_profile, stored_reports


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_killed_mid_stream_loses_no_report(mosquitto: Broker, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"kill-{secrets.token_hex(4)}"  # its sessions outlive the test: topics of its own
    monkeypatch.setenv("EDGEFLEET_TOPIC_PREFIX", prefix)
    data = tmp_path / "fleet"
    data.mkdir()
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    telemetry = Database(data / "telemetry.db", "telemetry", "telemetry store")
    port = free_port()
    procs = [serve_process(data, url, "ingest", tmp_path / "a.log", port=port)]
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=200, shifts=[0.0] * 10, rows=5)
    store = Store(data / "fleet.db")  # the devices and their report keys: the fleet takes signed reports only
    keys = enroll_keys(store, sorted({decode_report(r).device_id for r in reports}))
    store.close()
    sender = SignedSender(mosquitto, prefix, keys, "kill-sender")
    feeder = sender.stream([(decode_report(r).device_id, "telemetry", r) for r in reports])
    try:
        time.sleep(1.0)  # subscribed (serve_process returns when the API listens)
        feeder.start()
        wait_until(lambda: stored_reports(telemetry)[0] >= 100, 60, 0.01)
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        at_kill = stored_reports(telemetry)[0]
        assert 0 < at_kill < len(reports)  # killed mid-stream
        feeder.join(60)  # every report acknowledged by the broker: the device's outbox is empty
        procs.append(serve_process(data, url, "ingest", tmp_path / "a2.log", port=port))
        wait_until(lambda: stored_reports(telemetry) == (len(reports), len(reports)), 90)
        print(f"stored at kill {at_kill}, after restart {stored_reports(telemetry)} of {len(reports)}")
        assert stored_reports(telemetry) == (len(reports), len(reports))  # every report, merged once
    finally:
        sender.close()
        stop_processes([p for p in procs if p.poll() is None])
        telemetry.close()


def _events_stored(store: Store) -> tuple[int, int]:
    with store.read() as db:
        row = db.execute("SELECT COUNT(*), COUNT(DISTINCT device_id || ':' || seq) "
                         "FROM device_events").fetchone()
    return int(row[0]), int(row[1])


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_killed_while_events_stream_loses_no_event(mosquitto: Broker, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"kill-ev-{secrets.token_hex(4)}"
    monkeypatch.setenv("EDGEFLEET_TOPIC_PREFIX", prefix)
    data = tmp_path / "fleet"
    data.mkdir()
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    port = free_port()
    procs = [serve_process(data, url, "ingest", tmp_path / "a.log", port=port)]
    store = Store(data / "fleet.db")
    devices = [f"ev-{i:03d}" for i in range(200)]
    keys = enroll_keys(store, devices)  # events are signed reports too
    events = [(dev, encode_event(Event(type="director_accepted", timestamp=time.time(), seq=seq)))
              for seq in range(10) for dev in devices]
    sender = SignedSender(mosquitto, prefix, keys, "kill-ev-sender")
    feeder = sender.stream([(dev, "events", payload) for dev, payload in events])
    try:
        time.sleep(1.0)  # subscribed (serve_process returns when the API listens)
        feeder.start()
        wait_until(lambda: _events_stored(store)[0] >= 100, 60, 0.01)
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        at_kill = _events_stored(store)[0]
        assert 0 < at_kill < len(events)  # killed mid-stream
        feeder.join(60)  # every event acknowledged by the broker: the agents' outboxes are empty
        procs.append(serve_process(data, url, "ingest", tmp_path / "a2.log", port=port))
        wait_until(lambda: _events_stored(store) == (len(events), len(events)), 90)
        print(f"events stored at kill {at_kill}, after restart {_events_stored(store)} of {len(events)}")
        assert _events_stored(store) == (len(events), len(events))  # every event, stored once
    finally:
        sender.close()
        stop_processes([p for p in procs if p.poll() is None])
        store.close()
