"""Telemetry ingest through real Mosquitto into one database, with 1 and then 2 ingest workers.

10,000 reports (200 devices x 50 intervals, 20 features + 1 output, 100 inferences each, the
`ingest` benchmark's recipe) are published at QoS 1 to `.../devices/<id>/telemetry`; each
worker is a real `fleet serve --role ingest` process on the shared subscription
`$share/edgefleet-ingest/...`, all on one data directory. The rate is the count of stored
(device, seq) rows over time, between 10 % and 90 % of the reports (the last partial batch
waits for the periodic flush, which is not ingest work). Baseline from the same run:
`decode_report` alone over the same payloads (`ingest_*_decode_floor_reports_per_s`).
Metric names say the backend: `ingest_pg_*` on PostgreSQL (the default when a server answers on
127.0.0.1:5432: a scratch database per run, created and dropped here), `ingest_sqlite_*` on
SQLite (`--database sqlite:///...`, or no server); `benchmarks/db_url.py`. Stored rows are
counted through the fleet's database layer, so the count is the same query on both.
Goals (issue 11): one worker >= 0.7 of the decode floor, two workers >= 1.6 x one.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract.telemetry_codec import decode_report
from benchmarks.bench_ingest import report_payloads
from benchmarks.db_url import DEFAULT_PG, BenchDatabase, parse_database, probe_postgres
from fleet.db.database import Database
from simulators.broker import BrokerSettings, start_broker
from simulators.load_devices.scale_run import serve_process, stop_processes

NAME = "ingest_scale"
DESCRIPTION = "telemetry reports/s through Mosquitto into one database, 1 vs 2 ingest worker processes"
DEVICES = 200
INTERVALS = 50
# `serve_process` returns once the worker's API listens; its SUBSCRIBE was sent on CONNACK but
# is not acknowledged to anyone: give the broker a moment, so no report goes to no subscriber.
SETTLE_S = 2.0
STALL_S = 30.0  # the end: every report stored, or no new one for this long


def _payloads() -> list[bytes]:
    return report_payloads(DEVICES, INTERVALS)[1]


def _stored(telemetry: Database) -> int:
    with telemetry.read() as db:
        return int(db.scalar("SELECT COUNT(*) FROM telemetry_seen") or 0)


def _run_workers(root: Path, workers: int, payloads: list[tuple[str, bytes]],
                 bench_db: BenchDatabase) -> tuple[float, int]:
    """Reports/s stored by `workers` ingest processes on a fresh database (scratch on PostgreSQL)."""
    broker = start_broker(root / "broker", BrokerSettings(persistence=False), prefer_embedded=False)
    data = root / "fleet"
    data.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with bench_db.scratch(data) as location:
            url = location if isinstance(location, str) else None  # SQLite: the files in data/
            telemetry = Database(url or data / "telemetry.db", "telemetry", "telemetry store")
            try:
                broker_url = f"mqtt://{broker.host}:{broker.port}"
                procs = [serve_process(data, broker_url, "ingest", root / f"ingest-{i}.log", database=url)
                         for i in range(workers)]
                return _measure(broker.host, broker.port, payloads, telemetry)
            finally:
                stop_processes(procs)
                telemetry.close()
    finally:
        broker.stop()


def _measure(host: str, port: int, payloads: list[tuple[str, bytes]],
             telemetry: Database) -> tuple[float, int]:
    """(reports/s between 10 % and 90 % stored, reports stored in the end)."""
    time.sleep(SETTLE_S)
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sender", protocol=mqtt.MQTTv5)
    client.on_connect = lambda *_args: connected.set()
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    try:
        if not connected.wait(30):
            raise RuntimeError("the sender did not connect to the benchmark's broker")
        for topic, p in payloads:
            client.publish(topic, p, qos=1)
        n = len(payloads)
        marks: dict[str, float] = {}
        count = last = 0
        progress = time.monotonic()
        while time.monotonic() - progress < STALL_S:
            count = _stored(telemetry)
            now = time.monotonic()
            if count != last:
                last, progress = count, now
            if "lo" not in marks and count >= 0.1 * n:
                marks["lo"], marks["lo_n"] = now, count
            if "hi" not in marks and count >= 0.9 * n:
                marks["hi"], marks["hi_n"] = now, count
            if count >= n:
                break
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    if "hi" not in marks:
        raise RuntimeError(f"only {count} of {n} reports stored (no progress for {STALL_S:g} s)")
    return (marks["hi_n"] - marks["lo_n"]) / max(1e-9, marks["hi"] - marks["lo"]), count


def run(database: str | None = None) -> dict[str, float]:
    if database is None and probe_postgres():
        database = DEFAULT_PG  # a scratch database per run, dropped afterwards
    db = parse_database(database)
    tag = db.backend
    payloads = _payloads()
    # Decoding the device id for the topic is the sender's cost, not the workers': pre-decode once.
    t0 = time.perf_counter()
    topics = [f"edgefleet/v1/devices/{decode_report(p).device_id}/telemetry" for p in payloads]
    decode_rate = len(payloads) / (time.perf_counter() - t0)
    messages = list(zip(topics, payloads, strict=True))
    rates, stored = {}, {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            rates[workers], stored[workers] = _run_workers(Path(tmp), workers, messages, db)
    return {
        f"ingest_{tag}_reports_per_s_1": rates[1],
        f"ingest_{tag}_reports_per_s_2": rates[2],
        f"ingest_{tag}_2_vs_1_ratio": rates[2] / rates[1],
        f"ingest_{tag}_decode_floor_reports_per_s": decode_rate,
        f"ingest_{tag}_1_vs_decode_floor": rates[1] / decode_rate,
        f"ingest_{tag}_stored_1": float(stored[1]),  # of len(payloads): every report once
        f"ingest_{tag}_stored_2": float(stored[2]),
    }
