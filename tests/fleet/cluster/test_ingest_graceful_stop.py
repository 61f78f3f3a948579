"""An ingest worker stopped for good (SIGTERM) mid-stream does not strand its share: its acked
streams unsubscribe, store and acknowledge what the broker still had queued for them, and end
their sessions (DISCONNECT, Session Expiry 0; fleet/delivery/acked_stream.py), so the other
member of the share group gets everything sent afterwards, and every report is stored once
without the stopped worker ever coming back. (Before, its session kept taking every other
report until it expired, 1 h.)"""

from __future__ import annotations

import re
import secrets
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

from agent.contract.telemetry_codec import decode_report
from fleet.db.database import Database
from fleet.store import Store
from simulators.load_devices.scale_run import serve_process, stop_processes
from tests.support.broker import Broker, free_port
from tests.support.report_signing import enroll_keys
from tests.support.signed_sender import SignedSender, wait_until
from tests.support.telemetry import encoded_reports, small_profile, stored_reports


def _session_present(broker: Broker, client_id: str) -> bool:
    """Whether the broker still keeps a session for `client_id` (connects without a clean start,
    then leaves with Session Expiry 0, which drops whatever it found)."""
    found: dict[str, bool] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, flags, _rc, _p: found.setdefault("present", flags.session_present)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect(broker.host, broker.port, clean_start=False, properties=props)
    client.loop_start()
    deadline = time.monotonic() + 10
    while "present" not in found and time.monotonic() < deadline:
        time.sleep(0.02)
    client.disconnect()
    client.loop_stop()
    return found["present"]


def _stream_samples(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {(s.name, s.labels["stream"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("edgefleet_ingest_stream_")}


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_stopped_mid_stream_leaves_its_share_to_the_other(mosquitto: Broker, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"stop-{secrets.token_hex(4)}"  # a prefix of its own: other tests' sessions stay away
    monkeypatch.setenv("EDGEFLEET_TOPIC_PREFIX", prefix)
    data = tmp_path / "fleet"
    data.mkdir()
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    telemetry = Database(data / "telemetry.db", "telemetry", "telemetry store")
    monkeypatch.setenv("EDGEFLEET_METRICS_PUBLIC", "1")  # /metrics without a key, read below
    stopped = serve_process(data, url, "ingest", tmp_path / "a.log")
    other_port = free_port()
    procs = [stopped, serve_process(data, url, "ingest", tmp_path / "b.log", port=other_port)]
    reports = encoded_reports(small_profile(), "m", "1", "c", devices=200, shifts=[0.0] * 10, rows=5)
    store = Store(data / "fleet.db")
    keys = enroll_keys(store, sorted({decode_report(r).device_id for r in reports}))
    store.close()
    sender = SignedSender(mosquitto, prefix, keys, "stop-sender")
    # A steady stream: it goes on well after the stop (which takes seconds).
    feeder = sender.stream([(decode_report(r).device_id, "telemetry", r) for r in reports], pause_s=0.005)
    try:
        time.sleep(1.5)  # both subscribed (serve_process returns when the API listens)
        feeder.start()
        wait_until(lambda: stored_reports(telemetry)[0] >= 200, 60, 0.01)
        stopped.terminate()  # SIGTERM: a clean stop, for good
        assert stopped.wait(60) == 0
        at_stop = stored_reports(telemetry)[0]
        assert at_stop > 0 and feeder.is_alive()  # stopped mid-stream: more is sent after the stop
        feeder.join(60)
        wait_until(lambda: stored_reports(telemetry) == (len(reports), len(reports)), 60)
        print(f"stored at stop {at_stop}, then {stored_reports(telemetry)} of {len(reports)}")
        assert stored_reports(telemetry) == (len(reports), len(reports))  # every report, once, by the other
        log = (tmp_path / "a.log").read_text()
        assert log.count("session_ended=True") == 2  # telemetry and events: drained, sessions ended
        assert "stream.drain_incomplete" not in log
        # The other worker's /metrics after the traffic. Redeliveries of reports the stopped one
        # had stored are held (then deduplicated) until the next flush, `flush_after_s` later:
        # the gauge must come down to 0, not be 0 the moment the last report is stored.
        held = ("edgefleet_ingest_stream_held", "telemetry")
        assert wait_until(lambda: _stream_samples(other_port)[held] == 0, 15), "held acks never flushed"
        scrape = _stream_samples(other_port)
        assert scrape[("edgefleet_ingest_stream_acks_total", "telemetry")] >= len(reports) - at_stop
        assert scrape[("edgefleet_ingest_stream_flushes_total", "telemetry")] >= 1
        assert scrape[("edgefleet_ingest_stream_flush_failures_total", "telemetry")] == 0
        assert ("edgefleet_ingest_stream_stale_acks_total", "events") in scrape
        clients = re.findall(r"stream\.started stream=\w+ client=(\S+)", log)
        assert len(clients) == 2 and not any(_session_present(mosquitto, c) for c in clients)
    finally:
        sender.close()
        stop_processes([p for p in procs if p.poll() is None])
        telemetry.close()
