"""10,000 load devices through a canary 10/50/100 % on a fleet of several processes.

Two `fleet serve --role ingest` workers and two `--role controller` processes share one data
directory, one database (`--database`: SQLite files by default; with a PostgreSQL URL a scratch
database per drill, `benchmarks/db_url.py`; the metric names then end in `_pg`) and a private
Mosquitto; the load devices (`simulators/load_devices`, one selector
loop in this process) answer the director documents like agents would. Once the 50 % stage
runs, the lease holder is killed with SIGKILL (`simulators/load_devices/scale_run.py`).
Figures: `fleet_scale_devices`, `fleet_scale_passed` (1 when every device committed the new
bundle exactly once, every progress row succeeded and the audit names the hand-over),
`fleet_scale_canary_s` (rollout created to completed, the failover included),
`controller_failover_s` (SIGKILL to the standby holding the lease; the lease TTL is 5 s, the
default) and `failover_devices_lost`. Baseline from the same run: the same drill with 200
devices (`fleet_scale_200_canary_s`). `EDGEFLEET_BENCH_FLEET_DEVICES` changes the size.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from benchmarks.db_url import BenchDatabase, parse_database
from simulators.broker import BrokerSettings, start_broker
from simulators.load_devices.scale_run import ScaleConfig, ScaleResult, run_scale

NAME = "fleet_scale"
DESCRIPTION = "10,000 load devices, canary 10/50/100 %, 2 ingest workers, 2 controllers, leader killed"
DEVICES = int(os.environ.get("EDGEFLEET_BENCH_FLEET_DEVICES", "10000"))


def _drill(devices: int, bench_db: BenchDatabase) -> ScaleResult:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        broker = start_broker(root / "broker", BrokerSettings(persistence=False), prefer_embedded=False)
        try:
            with bench_db.scratch(root) as location:
                url = location if isinstance(location, str) else None  # SQLite: files in root/fleet
                cfg = ScaleConfig(devices=devices, install_s=1.0, leader_ttl_s=5.0, timeout_s=1800,
                                  database=url)
                return run_scale(cfg, root, broker.host, broker.port)
        finally:
            broker.stop()


def run(database: str | None = None) -> dict[str, float]:
    db = parse_database(database)
    print(f"fleet_scale: {db.backend}, {DEVICES} devices", file=sys.stderr, flush=True)
    small = _drill(200, db)
    big = _drill(DEVICES, db)
    if big.problems:
        print(f"fleet_scale problems: {big.problems}")
    tag = "" if db.backend == "sqlite" else "_pg"
    figures = {
        "fleet_scale_devices": float(big.devices),
        "fleet_scale_passed": 1.0 if big.passed else 0.0,
        "fleet_scale_canary_s": big.canary_s,
        "controller_failover_s": big.failover_s if big.failover_s is not None else float("nan"),
        "failover_devices_lost": float(big.devices_lost),
        "fleet_scale_committed_twice": float(big.committed_twice),
        "fleet_scale_200_canary_s": small.canary_s,
        "fleet_scale_200_passed": 1.0 if small.passed else 0.0,
    }
    return {f"{k}{tag}": v for k, v in figures.items()}
