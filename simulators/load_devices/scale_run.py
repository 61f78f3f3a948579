"""A fleet of several processes against load devices: the fault drill and the `fleet_scale` benchmark.

`run_scale(cfg, workdir, host, port)` prepares a data directory (two bundles, `cfg.devices` load
devices registered), starts `cfg.ingest_workers` processes `fleet serve --role ingest` and
`cfg.controllers` processes `fleet serve --role controller` on it (and on `cfg.database`, a
PostgreSQL URL, when given), connects the load devices
(one selector loop in this process), creates a canary and, when `cfg.kill_leader_at_stage` is
reached, kills the lease holder with SIGKILL. It then waits for the rollout to complete and
checks what matters: every device committed the new bundle exactly once, every progress row
succeeded, and the audit log names the hand-over (`leader.acquired` with the previous holder).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from fleet.settings import FleetSettings
from fleet.store import Store
from simulators.load_devices.fleet_setup import (
    device_ids,
    online_count,
    publish_versions,
    register_devices,
)
from simulators.load_devices.loop import LoadFleet

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ScaleConfig:
    devices: int = 200
    ingest_workers: int = 2
    controllers: int = 2
    stages: tuple[int, ...] = (10, 50, 100)
    bake_s: float = 0.0
    install_s: float = 0.5
    kill_leader_at_stage: int | None = 1  # stage index; None: no fault
    leader_ttl_s: float = 2.0
    timeout_s: float = 900.0
    database: str | None = None  # postgresql:// URL shared by every process; None: SQLite in workdir


@dataclass
class ScaleResult:
    devices: int
    passed: bool
    canary_s: float
    failover_s: float | None
    devices_lost: int
    committed_twice: int
    documents_max: int  # most director documents one device received
    handovers: list[tuple[str | None, str]] = field(default_factory=list)  # (previous, new) holders
    problems: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fleet process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"fleet process did not listen on {port} within {timeout} s")


def serve_process(data_dir: Path, broker: str, role: str, log: Path,
                  ttl_s: float = 5.0, database: str | None = None,
                  port: int | None = None) -> subprocess.Popen[bytes]:
    """`edgefleet fleet serve --role ROLE` on `data_dir` as a child process; returns once it listens.
    `database`: a `postgresql://` URL (through the environment, so a password never shows in
    the process list); None: the SQLite files in `data_dir`. `port`: the HTTP port (a free one by
    default; a restart on the same port resumes the process's MQTT session)."""
    port = port or _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEFLEET_CLUSTER_LEADER_TTL_S": str(ttl_s),
           "EDGEFLEET_DEVICE_BROKER_URL": broker}
    env.pop("EDGEFLEET_DATABASE_URL", None)
    if database is not None:
        env["EDGEFLEET_DATABASE_URL"] = database
    out = log.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "fleet", "serve", "--data-dir", str(data_dir),
                             "--port", str(port), "--broker", broker, "--role", role],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    _wait_port(port, proc)
    return proc


def _holder(store: Store) -> str | None:
    with store.read() as db:
        row = db.execute("SELECT holder, expires_at FROM leases WHERE name = 'controller'").fetchone()
    return str(row[0]) if row and row[0] and float(row[1]) > time.time() else None


def run_scale(cfg: ScaleConfig, workdir: Path, host: str, port: int) -> ScaleResult:
    """Run the drill (see the module docstring); the processes are stopped whatever happens."""
    data_dir = workdir / "fleet"
    broker = f"mqtt://{host}:{port}"
    settings = FleetSettings(data_dir=data_dir, broker_url=broker, device_broker_url=broker,
                             database_url=SecretStr(cfg.database) if cfg.database else None)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.database)
    procs: list[subprocess.Popen[bytes]] = []
    ids = device_ids(cfg.devices)
    fleet = LoadFleet(host, port, settings.topic_prefix, ids, active="loadmlp-1.0.0", install_s=cfg.install_s)
    try:
        _, v2 = publish_versions(settings, store, workdir / "bundles")
        register_devices(store, ids)
        for role, count in (("ingest", cfg.ingest_workers), ("controller", cfg.controllers)):
            for i in range(count):
                log = workdir / f"{role}-{i}.log"
                procs.append(serve_process(data_dir, broker, role, log, cfg.leader_ttl_s, cfg.database))
        fleet.start()
        if not fleet.wait_connected(max(60.0, cfg.devices / 50)):
            raise RuntimeError(f"only {fleet.stats.connected} of {cfg.devices} load devices connected")
        deadline = time.monotonic() + max(60.0, cfg.devices / 50)
        while online_count(store) < cfg.devices and time.monotonic() < deadline:
            time.sleep(0.2)
        strategy = {"kind": "canary", "stages": list(cfg.stages), "bake_s": cfg.bake_s,
                    "device_timeout_s": max(120.0, cfg.devices / 20)}
        started = time.monotonic()
        rid = store.rollouts.create(v2, "env=load", strategy, {}, "sim:load").id
        failover_s: float | None = None
        killed: str | None = None
        killed_at = 0.0
        deadline = started + cfg.timeout_s
        while time.monotonic() < deadline:
            ro = store.rollouts.get(rid)
            if ro.state.value in ("completed", "aborted", "failed", "cancelled"):
                break
            kill_at = cfg.kill_leader_at_stage
            if kill_at is not None and killed is None and ro.stage >= kill_at:
                killed = _holder(store)
                if killed is not None:
                    os.kill(int(killed.split(":")[1]), signal.SIGKILL)
                    killed_at = time.monotonic()
            if killed is not None and failover_s is None:
                now_holder = _holder(store)
                if now_holder is not None and now_holder != killed:
                    failover_s = time.monotonic() - killed_at
            time.sleep(0.05)
        canary_s = time.monotonic() - started
        return _verdict(store, rid, fleet, cfg, canary_s, failover_s, killed)
    finally:
        fleet.stop()
        stop_processes(procs)
        store.close()


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each (a clean stop), SIGKILL what has not exited after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _verdict(store: Store, rid: str, fleet: LoadFleet, cfg: ScaleConfig, canary_s: float,
             failover_s: float | None, killed: str | None) -> ScaleResult:
    problems: list[str] = []
    state = store.rollouts.get(rid).state.value
    if state != "completed":
        problems.append(f"rollout ended {state}")
    with store.read() as db:
        outcomes = {r["outcome"]: r["n"] for r in db.query(
            "SELECT outcome, COUNT(*) AS n FROM rollout_progress WHERE rollout_id = :id GROUP BY outcome",
            {"id": rid})}

    entries = reversed(store.audit.list(None, 1000, action="leader.acquired").items)  # oldest first
    handovers = [((e.before or {}).get("holder"), str(e.after["holder"])) for e in entries]
    succeeded = int(outcomes.get("succeeded", 0))
    lost = cfg.devices - succeeded
    if lost:
        problems.append(f"outcomes {outcomes}")
    committed_twice = sum(1 for d in fleet.devices if len(d.applied) > 1)
    never = sum(1 for d in fleet.devices if d.applied != ["loadmlp-2.0.0"] and len(d.applied) <= 1)
    if committed_twice or never:
        problems.append(f"{committed_twice} devices committed twice, {never} never")
    if killed is not None and not any(prev == killed for prev, _ in handovers):
        problems.append(f"no leader.acquired names the killed leader {killed}")
    if cfg.kill_leader_at_stage is not None and killed is None:
        problems.append("the leader was never killed")
    docs_max = max((d.last_sequence for d in fleet.devices), default=0)
    return ScaleResult(cfg.devices, not problems, canary_s, failover_s, lost + never, committed_twice,
                       docs_max, handovers, problems)
