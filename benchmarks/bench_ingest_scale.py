"""Telemetry ingest through real Mosquitto into one database, with 1 and then 2 ingest workers.

10,000 reports (200 devices x 50 intervals, 20 features + 1 output, 100 inferences each, the
`ingest` benchmark's recipe) are published at QoS 1 to `.../devices/<id>/telemetry`; each
worker is a real `fleet serve --role ingest` process on the shared subscription
`$share/edgefleet-ingest/...`, all on one data directory. The rate is the count of stored
(device, seq) rows over time, between 10 % and 90 % of the reports (the last partial batch
waits for the periodic flush, which is not ingest work). Baseline from the same run:
`decode_report` alone over the same payloads (`ingest_*_decode_floor_reports_per_s`).
Metric names say the backend: `ingest_pg_*` on PostgreSQL, `ingest_sqlite_*` on SQLite
(the default until the PostgreSQL backend lands; `--database`, `benchmarks/db_url.py`).
Goals (issue 11): one worker >= 0.7 of the decode floor, two workers >= 1.6 x one.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract.telemetry import decode_report, encode_report
from agent.telemetry import TelemetrySketch
from benchmarks.db_url import parse_database, probe_postgres
from fleet.registry.profile import compute_reference_profile
from simulators.broker import BrokerSettings, start_broker
from simulators.load_devices.scale_run import serve_process, stop_processes

NAME = "ingest_scale"
DESCRIPTION = "telemetry reports/s through Mosquitto into one database, 1 vs 2 ingest worker processes"
DEVICES = 200
INTERVALS = 50


def _payloads() -> list[bytes]:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20_000, 20)).astype(np.float32)
    prof = compute_reference_profile(ref, [f"f{i}" for i in range(20)], outputs=ref[:, :3].sum(axis=1))
    out: list[bytes] = []
    for d in range(DEVICES):
        ticks = iter(np.arange(1_700_000_000.0, 1_700_000_000.0 + 60.0 * (INTERVALS + 1), 60.0).tolist())
        sk = TelemetrySketch(prof, f"device-{d:04d}", "mlp", "1.0.0", clock=ticks.__next__,
                             resource_probe=lambda: (40_000_000, 0.5, 0.1))
        for _ in range(INTERVALS):
            x = rng.normal(size=(100, 20)).astype(np.float32)
            sk.update(x, x[:, :3].sum(axis=1), 0.002)
            out.append(encode_report(sk.snapshot_and_reset()))
    return out


def _stored(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM telemetry_seen").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def _run_workers(root: Path, workers: int, payloads: list[bytes]) -> float:
    broker = start_broker(root / "broker", BrokerSettings(persistence=False), prefer_embedded=False)
    data = root / "fleet"
    procs = []
    try:
        url = f"mqtt://{broker.host}:{broker.port}"
        procs = [serve_process(data, url, "ingest", root / f"ingest-{i}.log") for i in range(workers)]
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sender", protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.connect(broker.host, broker.port)
        client.loop_start()
        for p in payloads:  # device id in the topic: the one in the report
            client.publish(f"edgefleet/v1/devices/{decode_report(p).device_id}/telemetry", p, qos=1)
        n = len(payloads)
        marks: dict[str, float] = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            count = _stored(data / "telemetry.db")
            now = time.monotonic()
            if "lo" not in marks and count >= 0.1 * n:
                marks["lo"], marks["lo_n"] = now, count
            if count >= 0.9 * n:
                marks["hi"], marks["hi_n"] = now, count
                break
            time.sleep(0.05)
        client.loop_stop()
        client.disconnect()
        if "hi" not in marks:
            raise RuntimeError(f"only {count} of {n} reports stored in time")
        return (marks["hi_n"] - marks["lo_n"]) / max(1e-9, marks["hi"] - marks["lo"])
    finally:
        stop_processes(procs)
        broker.stop()


def run(database: str | None = None) -> dict[str, float]:
    db = parse_database(database)
    if database is None and probe_postgres():
        print("ingest_scale: PostgreSQL answers on 127.0.0.1:5432, but this build's fleet/db opens SQLite "
              "only: measuring SQLite (the metric names say so)")
    tag = db.backend
    payloads = _payloads()
    # Decoding the device id for the topic is the sender's cost, not the workers': pre-decode once.
    t0 = time.perf_counter()
    for p in payloads:
        decode_report(p)
    decode_rate = len(payloads) / (time.perf_counter() - t0)
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            rates[workers] = _run_workers(Path(tmp), workers, payloads)
    return {
        f"ingest_{tag}_reports_per_s_1": rates[1],
        f"ingest_{tag}_reports_per_s_2": rates[2],
        f"ingest_{tag}_2_vs_1_ratio": rates[2] / rates[1],
        f"ingest_{tag}_decode_floor_reports_per_s": decode_rate,
        f"ingest_{tag}_1_vs_decode_floor": rates[1] / decode_rate,
    }
