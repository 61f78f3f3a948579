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
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.contract.protocol import Event, encode_event
from agent.contract.telemetry_codec import decode_report
from fleet.db.database import Database
from fleet.store import Store
from simulators.load_devices.scale_run import serve_process, stop_processes
from tests.support.broker import Broker, free_port
from tests.support.report_signing import DeviceKey, enroll_keys
from tests.support.signed_sender import SignedSender, wait_until
from tests.support.telemetry import encoded_reports, small_profile, stored_reports


def _kill_mid_stream_and_restart(mosquitto: Broker, tmp_path: Path, data: Path, prefix: str,
                                 keys: dict[str, DeviceKey], items: list[tuple[str, str, bytes]],
                                 stored: Callable[[], tuple[int, int]]) -> None:
    """Stream `items` (device, kind, payload) signed by their devices to one ingest worker,
    SIGKILL it once 100 are stored, start it again in its slot (same port: same client ids),
    and check that every item ends up stored exactly once (`stored`: rows, distinct keys)."""
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    port = free_port()
    procs = [serve_process(data, url, "ingest", tmp_path / "a.log", port=port)]
    sender = SignedSender(mosquitto, prefix, keys, f"{prefix}-sender")
    feeder = sender.stream(items)
    try:
        time.sleep(1.0)  # subscribed (serve_process returns when the API listens)
        feeder.start()
        wait_until(lambda: stored()[0] >= 100, 60, 0.01)
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        at_kill = stored()[0]
        assert 0 < at_kill < len(items)  # killed mid-stream
        feeder.join(60)  # every item acknowledged by the broker: the devices' outboxes are empty
        procs.append(serve_process(data, url, "ingest", tmp_path / "a2.log", port=port))
        wait_until(lambda: stored() == (len(items), len(items)), 90)
        print(f"stored at kill {at_kill}, after restart {stored()} of {len(items)}")
        assert stored() == (len(items), len(items))  # every item, stored once
    finally:
        sender.close()
        stop_processes([p for p in procs if p.poll() is None])


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_killed_mid_stream_loses_no_report(mosquitto: Broker, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"kill-{secrets.token_hex(4)}"  # its sessions outlive the test: topics of its own
    monkeypatch.setenv("EDGEFLEET_TOPIC_PREFIX", prefix)
    data = tmp_path / "fleet"
    data.mkdir()
    telemetry = Database(data / "telemetry.db", "telemetry", "telemetry store")
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=200, shifts=[0.0] * 10, rows=5)
    store = Store(data / "fleet.db")  # the devices and their report keys: the fleet takes signed reports only
    keys = enroll_keys(store, sorted({decode_report(r).device_id for r in reports}))
    store.close()
    try:
        _kill_mid_stream_and_restart(mosquitto, tmp_path, data, prefix, keys,
                                     [(decode_report(r).device_id, "telemetry", r) for r in reports],
                                     lambda: stored_reports(telemetry))
    finally:
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
    store = Store(data / "fleet.db")
    devices = [f"ev-{i:03d}" for i in range(200)]
    keys = enroll_keys(store, devices)  # events are signed reports too
    events = [(dev, "events", encode_event(Event(type="director_accepted", timestamp=time.time(), seq=seq)))
              for seq in range(10) for dev in devices]
    try:
        _kill_mid_stream_and_restart(mosquitto, tmp_path, data, prefix, keys, events,
                                     lambda: _events_stored(store))
    finally:
        store.close()
