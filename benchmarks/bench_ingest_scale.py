"""Telemetry ingest through real Mosquitto into one database, with 1 and then 2 ingest workers.

10,000 reports (200 devices x 50 intervals, 20 features + 1 output, 100 inferences each, the
`ingest` benchmark's recipe), each signed as its device (issue 14: the fleet requires signed
reports by default, so the devices and their report keys are registered in the run's database
first), are published at QoS 1 to `.../devices/<id>/telemetry`; each worker is a real `fleet
serve --role ingest` process on the shared subscription, all on one data directory. The rate is
the count of stored (device, seq) rows over time, between 10 % and 90 % of the reports (the last
partial batch waits for the periodic flush, which is not ingest work).

Baselines from the same run, so the goals can be judged against what the machine allows:
- `ingest_*_decode_floor_reports_per_s`: `decode_report` alone over the same payloads, in-process;
- `ingest_receive_floor_reports_per_s`: a bare paho subscriber in a process of its own
  (benchmarks/receive_floor.py) taking the same signed reports off a broker of the same kind and
  dropping them, i.e. the MQTT client's own cost; `ingest_receive_plus_decode_floor_reports_per_s`:
  the same subscriber decoding each;
- CPU accounting (benchmarks/proc_cpu.py) of every run's window: CPU seconds of the sender (this
  process), the broker, PostgreSQL (the run's backends and the server's own processes) and the
  workers, as cores kept busy (`ingest_*_cpu_cores_busy_1`/`_2`) and µs per report per component
  (`ingest_*_cpu_us_per_report_<component>_1`/`_2`; `worker` sums the workers).
Metric names say the backend: `ingest_pg_*` on PostgreSQL (the default when a server answers on
127.0.0.1:5432: a scratch database per run, created and dropped here), `ingest_sqlite_*` on
SQLite (`--database sqlite:///...`, or no server); `benchmarks/db_url.py`. Stored rows are
counted through the fleet's database layer, so the count is the same query on both.
Goals (issue 11): one worker >= 0.7 of the decode floor, two workers >= 1.6 x one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from pydantic import SecretStr

from agent.contract.telemetry_codec import decode_report
from benchmarks.bench_ingest import report_payloads
from benchmarks.db_url import DEFAULT_PG, BenchDatabase, parse_database, probe_postgres
from benchmarks.proc_cpu import CpuMeter, postgres_pids
from fleet.db.database import Database
from fleet.settings import FleetSettings
from fleet.store import Store
from simulators.broker import BrokerSettings, start_broker
from simulators.load_devices.fleet_setup import register_devices
from simulators.load_devices.scale_run import serve_process, stop_processes
from simulators.load_devices.signing import LoadSigner

NAME = "ingest_scale"
DESCRIPTION = "telemetry reports/s through Mosquitto into one database, 1 vs 2 ingest worker processes"
DEVICES = 200
INTERVALS = 50
# `serve_process` returns once the worker's API listens; its SUBSCRIBE was sent on CONNACK but
# is not acknowledged to anyone: give the broker a moment, so no report goes to no subscriber.
SETTLE_S = 2.0
STALL_S = 30.0  # the end: every report stored, or no new one for this long
ROOT = Path(__file__).resolve().parent.parent
Messages = list[tuple[str, bytes, Properties]]


def _messages() -> tuple[list[bytes], Messages, float]:
    """The payloads, the signed messages (topic, payload, PUBLISH properties) and the decode floor."""
    payloads = report_payloads(DEVICES, INTERVALS)[1]
    # Decoding the device id for the topic is the sender's cost, not the workers': pre-decode once.
    t0 = time.perf_counter()
    devices = [decode_report(p).device_id for p in payloads]
    decode_rate = len(payloads) / (time.perf_counter() - t0)
    signer = LoadSigner()
    messages = []
    for device, p in zip(devices, payloads, strict=True):
        topic = f"edgefleet/v1/devices/{device}/telemetry"
        messages.append((topic, p, signer.properties(device, topic, p)))
    return payloads, messages, decode_rate


def _stored(telemetry: Database) -> int:
    with telemetry.read() as db:
        return int(db.scalar("SELECT COUNT(*) FROM telemetry_seen") or 0)


class _Sender:
    """The benchmark's publisher: one paho client, every message at QoS 1 as fast as it goes."""

    def __init__(self, host: str, port: int) -> None:
        connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sender", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda *_args: connected.set()
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect(host, port)
        self.client.loop_start()
        if not connected.wait(30):
            self.close()
            raise RuntimeError("the sender did not connect to the benchmark's broker")

    def send(self, messages: Messages) -> None:
        for topic, payload, props in messages:
            self.client.publish(topic, payload, qos=1, properties=props)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _meter(broker: object, procs: list[subprocess.Popen[bytes]], database: str | None) -> CpuMeter:
    groups: dict[str, Callable[[], list[int]]] = {"sender": lambda: [os.getpid()]}
    broker_proc = getattr(broker, "proc", None)  # None for the embedded broker (in this process)
    if broker_proc is not None:
        groups["broker"] = lambda: [broker_proc.pid]
    if database is not None:
        name = urlsplit(database).path.lstrip("/")
        groups["postgres"] = lambda: postgres_pids(name)
    groups["worker"] = lambda: [p.pid for p in procs]
    return CpuMeter(groups)


def _run_workers(root: Path, workers: int, messages: Messages,
                 bench_db: BenchDatabase) -> tuple[float, int, dict[str, float]]:
    """(reports/s, stored, CPU figures) of `workers` ingest processes on a fresh database."""
    broker = start_broker(root / "broker", BrokerSettings(persistence=False), prefer_embedded=False)
    data = root / "fleet"
    data.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with bench_db.scratch(data) as location:
            url = location if isinstance(location, str) else None  # SQLite: the files in data/
            settings = FleetSettings(data_dir=data, database_url=SecretStr(url) if url else None)
            store = Store(settings.database)
            try:
                register_devices(store, sorted({t.split("/")[3] for t, _, _ in messages}))
            finally:
                store.close()
            telemetry = Database(url or data / "telemetry.db", "telemetry", "telemetry store")
            try:
                broker_url = f"mqtt://{broker.host}:{broker.port}"
                procs = [serve_process(data, broker_url, "ingest", root / f"ingest-{i}.log", database=url)
                         for i in range(workers)]
                time.sleep(SETTLE_S)
                meter = _meter(broker, procs, url)
                return _measure(_Sender(broker.host, broker.port), messages, telemetry, meter)
            finally:
                stop_processes(procs)
                telemetry.close()
    finally:
        broker.stop()


def _measure(sender: _Sender, messages: Messages, telemetry: Database,
             meter: CpuMeter) -> tuple[float, int, dict[str, float]]:
    """(reports/s between 10 % and 90 % stored, reports stored in the end, CPU figures of that window)."""
    try:
        sender.send(messages)
        n = len(messages)
        marks: dict[str, float] = {}
        count = last = 0
        progress = sampled = time.monotonic()
        while time.monotonic() - progress < STALL_S:
            count = _stored(telemetry)
            now = time.monotonic()
            if count != last:
                last, progress = count, now
            if "lo" not in marks and count >= 0.1 * n:
                meter.start()
                marks["lo"], marks["lo_n"] = now, count
            if "hi" not in marks and count >= 0.9 * n:
                meter.sample()
                marks["hi"], marks["hi_n"] = now, count
            elif "lo" in marks and "hi" not in marks and now - sampled > 0.5:
                meter.sample()  # a backend that exits before the end keeps its last reading
                sampled = now
            if count >= n:
                break
            time.sleep(0.05)
    finally:
        sender.close()
    if "hi" not in marks:
        raise RuntimeError(f"only {count} of {n} reports stored (no progress for {STALL_S:g} s)")
    wall, reports = max(1e-9, marks["hi"] - marks["lo"]), marks["hi_n"] - marks["lo_n"]
    return reports / wall, count, _cpu_figures(meter.seconds(), wall, reports)


def _cpu_figures(seconds: dict[str, float], wall: float, reports: float) -> dict[str, float]:
    out = {"cores_busy": sum(seconds.values()) / wall}
    for name, s in seconds.items():
        out[f"us_per_report_{name}"] = s / max(1.0, reports) * 1e6
    return out


def _receive_floor(root: Path, messages: Messages, decode: bool) -> tuple[float, dict[str, float]]:
    """(reports/s, CPU figures) of the bare subscriber (benchmarks/receive_floor.py) on its own broker."""
    broker = start_broker(root / f"broker-floor-{decode}", BrokerSettings(persistence=False),
                          prefer_embedded=False)
    argv = [sys.executable, "-m", "benchmarks.receive_floor", broker.host, str(broker.port),
            str(len(messages))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sub = subprocess.Popen([*argv, *(["--decode"] if decode else [])], stdout=subprocess.PIPE, env=env,
                           cwd=str(ROOT), text=True)
    try:
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != "ready":
            raise RuntimeError("the receive-floor subscriber did not subscribe")
        sender = _Sender(broker.host, broker.port)
        try:
            sender.send(messages)
            out = json.loads(sub.stdout.readline())
        finally:
            sender.close()
        sub.wait(30)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
        broker.stop()
    if out.get("received") != len(messages):
        raise RuntimeError(f"the receive-floor subscriber got {out.get('received')} of "
                           f"{len(messages)} reports")
    return float(out["rate"]), {"us_per_report": float(out["cpu_s"]) / len(messages) * 1e6}


def run(database: str | None = None) -> dict[str, float]:
    if database is None and probe_postgres():
        database = DEFAULT_PG  # a scratch database per run, dropped afterwards
    db = parse_database(database)
    tag = db.backend
    _, messages, decode_rate = _messages()
    rates, stored, cpu = {}, {}, {}
    floors: dict[bool, tuple[float, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for decode in (False, True):
            floors[decode] = _receive_floor(Path(tmp), messages, decode)
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            rates[workers], stored[workers], cpu[workers] = _run_workers(Path(tmp), workers, messages, db)
    out = {
        f"ingest_{tag}_reports_per_s_1": rates[1],
        f"ingest_{tag}_reports_per_s_2": rates[2],
        f"ingest_{tag}_2_vs_1_ratio": rates[2] / rates[1],
        f"ingest_{tag}_decode_floor_reports_per_s": decode_rate,
        f"ingest_{tag}_1_vs_decode_floor": rates[1] / decode_rate,
        "ingest_receive_floor_reports_per_s": floors[False][0],
        "ingest_receive_plus_decode_floor_reports_per_s": floors[True][0],
        "ingest_receive_floor_cpu_us_per_report": floors[False][1]["us_per_report"],
        "ingest_receive_plus_decode_floor_cpu_us_per_report": floors[True][1]["us_per_report"],
        f"ingest_{tag}_stored_1": float(stored[1]),  # of len(messages): every report once
        f"ingest_{tag}_stored_2": float(stored[2]),
    }
    for workers in (1, 2):
        for key, value in cpu[workers].items():
            out[f"ingest_{tag}_cpu_{key}_{workers}"] = value
    out[f"ingest_{tag}_worker_cpu_us_per_report_1"] = cpu[1].get("us_per_report_worker", 0.0)
    return out
