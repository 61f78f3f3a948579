"""An ingest worker killed with SIGKILL and started again in its slot (same host and port)
resumes its MQTT session: what the broker queued for it while it was dead is stored, once.

Why this matters: Mosquitto keeps handing a share group's messages round-robin to a member
whose persistent session is offline, queuing them in that session; with a client id that
changed on every start (the pid), half the reports sent after a worker died stayed stranded
there until the session expired (1 h)."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import pytest

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
def test_a_restarted_worker_gets_what_was_queued_for_it_while_dead(mosquitto: Broker, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A prefix of its own: the workers' sessions outlive the test (1 h expiry) and stay members
    # of the share group, so on the shared topics they would take other tests' reports.
    prefix = f"restart-{secrets.token_hex(4)}"
    monkeypatch.setenv("EDGEFLEET_TOPIC_PREFIX", prefix)
    data = tmp_path / "fleet"
    data.mkdir()
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    telemetry = Database(data / "telemetry.db", "telemetry", "telemetry store")
    port = free_port()
    first = serve_process(data, url, "ingest", tmp_path / "a.log", port=port)
    procs = [first, serve_process(data, url, "ingest", tmp_path / "b.log")]
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=60, shifts=[0.0, 0.0], rows=20)
    store = Store(data / "fleet.db")  # the devices and their report keys: the fleet takes signed reports only
    keys = enroll_keys(store, sorted({decode_report(r).device_id for r in reports}))
    store.close()
    sender = SignedSender(mosquitto, prefix, keys, "restart-sender")
    try:
        time.sleep(2.0)  # both subscribed (serve_process returns when the API listens)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        time.sleep(1.0)  # the broker has seen the connection drop
        sent = [sender.publish((decode_report(r).device_id, "telemetry", r)) for r in reports]
        for info in sent:
            info.wait_for_publish(10)
        time.sleep(1.0)
        assert stored_reports(telemetry)[0] < len(reports)  # the dead member's share is waiting for it
        procs.append(serve_process(data, url, "ingest", tmp_path / "a2.log", port=port))
        wait_until(lambda: stored_reports(telemetry) == (len(reports), len(reports)), 60)
        assert stored_reports(telemetry) == (len(reports), len(reports))  # every report, merged once
    finally:
        sender.close()
        stop_processes([p for p in procs if p.poll() is None])
        telemetry.close()
