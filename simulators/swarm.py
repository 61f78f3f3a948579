"""A swarm of real agents spread over worker processes, one selector loop per process.

Why processes: one Python process is bound to one core by the GIL, and every device does
real work (TUF verification, bundle extraction, golden vectors, inference for telemetry), so
the swarm uses at least as many worker processes as cores, and more for large swarms (see
`auto_processes`). Inside a worker, every device is a
`SwarmAgent` (the real `AgentDaemon`) on the worker's `SwarmLoop`; devices of one worker share
loaded model sessions for identical model bytes; each device's state directory, slots,
ledger, queue and decisions are its own. A traffic thread feeds every serving device batches
from its `DataGenerator` (its cohort's drift applied), so telemetry flows as on a real site.

The controller talks to workers over pipes: `stats`, `drift`, `traffic`, `stop`.
`kill_worker` SIGKILLs one worker (every device in it crashes wherever it was, mid-install
included) and `restart_worker` starts it again on the same state directories: the agents
resume from their state records, as a rebooted gateway would.

This module is the controller's side; what runs inside each worker process (its devices, ticker
and traffic thread, the command loop) is `simulators.swarm_worker`, and the spec and stats
they exchange are `simulators.swarm_records`.

Errors: `Swarm.start` raises `fleet.errors.FleetTransportError` when a worker does not come
up in time and `FleetMisuseError` for an inconsistent spec.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from agent.logs import log_event
from fleet.errors import FleetMisuseError, FleetTransportError
from simulators.datagen import DriftSpec
from simulators.swarm_device import DeviceProfile
from simulators.swarm_records import SwarmSpec, WorkerStats
from simulators.swarm_worker import worker_main

logger = logging.getLogger(__name__)


@dataclass
class _Worker:
    index: int
    profiles: list[DeviceProfile]
    proc: Any = None
    conn: Connection | None = None
    last: WorkerStats | None = None


#: Devices one worker process holds well (see `auto_processes`).
DEVICES_PER_WORKER = 200


def auto_processes(devices: int) -> int:
    """One worker per core, and more when a worker would hold over `DEVICES_PER_WORKER` devices.

    Every device has its own threads (lifecycle, ticker), and they all contend for their
    worker's GIL with the worker's one MQTT loop thread; measured here, 200 devices per worker
    kept the loop responsive, while 500 per worker starved it for minutes (the broker closed
    the silent connections as keepalive timeouts). Processes share the cores fairly; the GIL
    does not, so more workers on the same two cores is the cheaper way to hold many devices.
    """
    return max(os.cpu_count() or 1, -(-devices // DEVICES_PER_WORKER))


class Swarm:
    """Devices spread round-robin over `processes` workers (0: `auto_processes`)."""

    def __init__(self, spec: SwarmSpec, profiles: Sequence[DeviceProfile], processes: int = 0) -> None:
        if not profiles:
            raise FleetMisuseError("a swarm needs at least one device")
        ids = [p.device_id for p in profiles]
        if len(set(ids)) != len(ids):
            raise FleetMisuseError("device ids must be unique")
        n = max(1, min(processes or auto_processes(len(profiles)), len(profiles)))
        self.spec = spec
        self.profiles = list(profiles)
        self.workers = [_Worker(i, self.profiles[i::n]) for i in range(n)]
        self._ctx = mp.get_context("spawn")
        self.connect_s = 0.0

    @property
    def device_ids(self) -> list[str]:
        return [p.device_id for p in self.profiles]

    def _spawn(self, w: _Worker) -> None:
        parent, child = self._ctx.Pipe()
        w.proc = self._ctx.Process(
            target=worker_main,
            args=(w.index, child, self.spec, w.profiles),
            name=f"swarm-{w.index}",
            daemon=True,
        )
        w.proc.start()
        child.close()
        w.conn = parent

    def _await_ready(self, w: _Worker, deadline: float) -> None:
        assert w.conn is not None
        if not w.conn.poll(max(0.0, deadline - time.monotonic())):
            raise FleetTransportError(
                f"swarm worker {w.index} did not start within {self.spec.start_timeout_s}s"
            )
        try:
            _tag, stats = w.conn.recv()
        except (EOFError, OSError):
            code = w.proc.exitcode if w.proc is not None else None
            raise FleetTransportError(
                f"swarm worker {w.index} died while starting (exit code {code})"
            ) from None
        w.last = stats

    def start(self) -> Swarm:
        """Start every worker and wait until each has built its devices (not until connected)."""
        self.spec.state_root.mkdir(parents=True, exist_ok=True)
        for w in self.workers:
            self._spawn(w)
        deadline = time.monotonic() + self.spec.start_timeout_s
        for w in self.workers:
            self._await_ready(w, deadline)
        log_event(logger, "swarm.started", devices=len(self.profiles), workers=len(self.workers))
        return self

    def wait_connected(self, timeout: float) -> bool:
        """Block until every device is connected to the broker; records `connect_s`."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if sum(s.connected for s in self.stats()) == len(self.profiles):
                self.connect_s = time.monotonic() - t0
                return True
            time.sleep(0.2)
        return False

    def _ask(self, w: _Worker, cmd: str, arg: Any = None, timeout: float = 30.0) -> Any:
        if w.conn is None or w.proc is None or not w.proc.is_alive():
            return None
        try:
            w.conn.send((cmd, arg))
            if not w.conn.poll(timeout):
                return None
            _, value = w.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            return None
        return value

    def stats(self) -> list[WorkerStats]:
        out = []
        for w in self.workers:
            s = self._ask(w, "stats")
            if s is not None:
                w.last = s
                out.append(s)
        return out

    def set_drift(self, drifts: Sequence[DriftSpec]) -> None:
        """Apply these drifts (times relative to each worker's start) to every device's data."""
        for w in self.workers:
            self._ask(w, "drift", list(drifts))

    def take_quality(self, by_cohort: bool = False) -> dict[str, list[float]]:
        """Per bundle (per `<cohort>/<bundle>` with `by_cohort`; each kept apart, taking one
        leaves the other), the accuracy of every batch served since the last call (needs
        `truth_seed`)."""
        merged: dict[str, list[float]] = {}
        for w in self.workers:
            for bundle, values in (self._ask(w, "quality", by_cohort) or {}).items():
                merged.setdefault(bundle, []).extend(values)
        return merged

    def set_traffic(self, on: bool) -> None:
        for w in self.workers:
            self._ask(w, "traffic", on)

    def check_alive(self) -> None:
        """Raise `FleetTransportError` if a worker died without `kill_worker` (a crash).

        Scenarios call it while they wait, so a crashed worker fails the run at once with its
        exit code instead of leaving its devices silent until every timeout has run out.
        """
        for w in self.workers:
            if w.conn is not None and w.proc is not None and w.proc.exitcode is not None:
                ids = ", ".join(p.device_id for p in w.profiles[:5])
                raise FleetTransportError(
                    f"swarm worker {w.index} died (exit code {w.proc.exitcode}) with devices {ids}"
                    + (" ..." if len(w.profiles) > 5 else "")
                )

    def kill_worker(self, index: int) -> list[str]:
        """SIGKILL one worker: its devices crash wherever they are. Returns their ids."""
        w = self.workers[index]
        if w.proc is not None and w.proc.is_alive():
            w.proc.kill()
            w.proc.join(10)
        if w.conn is not None:
            w.conn.close()
            w.conn = None
        log_event(logger, "swarm.worker_killed", worker=index, devices=len(w.profiles))
        return [p.device_id for p in w.profiles]

    def restart_worker(self, index: int) -> None:
        """Start a killed worker again on the same devices and state directories."""
        w = self.workers[index]
        self._spawn(w)
        self._await_ready(w, time.monotonic() + self.spec.start_timeout_s)

    def stop(self) -> None:
        for w in self.workers:
            self._ask(w, "stop", timeout=20)
        for w in self.workers:
            if w.proc is not None:
                w.proc.join(10)
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(5)
            if w.conn is not None:
                w.conn.close()

    def __enter__(self) -> Swarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rss_per_device_mb(self) -> float:
        """(worker RSS - its RSS before devices) summed over workers, per device."""
        stats = self.stats()
        extra = sum(s.rss_mb - s.base_rss_mb for s in stats)
        return extra / max(1, sum(s.devices for s in stats))


def make_profiles(
    n: int,
    cohorts: Sequence[str] = ("eu", "us"),
    onnx_only_share: float = 0.0,
    low_memory_share: float = 0.0,
    old_agent_share: float = 0.0,
    prefix: str = "dev",
) -> list[DeviceProfile]:
    """`n` device profiles, cohorts round-robin; the first shares of devices are heterogeneous
    (deterministic: every k-th device), so scenarios know exactly which devices are which."""

    def every(share: float, i: int, offset: int) -> bool:
        return share > 0 and (i + offset) % max(1, round(1 / share)) == 0

    out = []
    for i in range(n):
        out.append(
            DeviceProfile(
                device_id=f"{prefix}-{i:05d}",
                cohort=cohorts[i % len(cohorts)],
                runtimes=("onnx",) if every(onnx_only_share, i, 1) else ("onnx", "tflite"),
                memory_mb=128.0 if every(low_memory_share, i, 2) else 1024.0,
                agent_version="0.0.9" if every(old_agent_share, i, 3) else "0.1.0",
            )
        )
    return out
