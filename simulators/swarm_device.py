"""One simulated device: the real `AgentDaemon` on a shared selector loop and a shared model pool.

Why the real daemon: the scenarios must prove what a device does (verify, install, probation,
rollback, telemetry), so each simulated device is the agent's own code with its own device
id, state directory, slots, TUF metadata, director ledger and telemetry queue. Only two
things are shared inside one worker process: the MQTT network loop (`SwarmLoop`) and loaded
model sessions for identical model bytes (`SharedModelCatalog`, keyed by the manifest's model
digest and thread count): a thousand devices running the same bundle hold one onnxruntime
session, each through its own `LoadedModel`, and the session closes when the last one does.

Heterogeneity comes from a `DeviceProfile`: the runtimes the device supports (loading a bundle
for another runtime fails like a missing engine would), its memory and agent version (reported
to the fleet for its compatibility checks), its cohort and labels.

Errors: `SharedModelCatalog.load` raises `agent.errors.RuntimeFailure` for a runtime the
device does not support, and whatever `agent.runtimes.load_model` raises.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import AgentConfig
from agent.contract.manifest import Manifest
from agent.contract.protocol import ReportedState
from agent.daemon.core import AgentDaemon
from agent.daemon.serving import ModelCatalog
from agent.errors import RuntimeFailure
from agent.runtimes import load_model
from agent.runtimes.base import LoadedModel
from simulators.faults import SkewedClock
from simulators.swarm_loop import SwarmLoop

ALL_RUNTIMES = ("onnx", "tflite")  # manifest runtime names
_REPORTED_RUNTIME = {"onnx": "onnxruntime", "tflite": "litert"}


@dataclass(frozen=True)
class DeviceProfile:
    """What makes one simulated device different from the next."""

    device_id: str
    cohort: str = "default"
    runtimes: tuple[str, ...] = ALL_RUNTIMES
    memory_mb: float = 1024.0
    agent_version: str = "0.1.0"
    labels: dict[str, str] = field(default_factory=dict)
    clock_offset_s: float = 0.0  # the device's wall clock ahead (+) of or behind (-) real time


class _PooledRuntime:
    """A reference to a shared runtime; `close` releases the reference, not the session."""

    def __init__(self, pool: _SessionPool, key: tuple[str, int], runtime: Any) -> None:
        self._pool, self._key, self._runtime = pool, key, runtime
        self._closed = False

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._runtime.run(inputs)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.release(self._key)

    def __getattr__(self, name: str) -> Any:  # info(), load(), ... of the real runtime
        return getattr(self._runtime, name)


class _SessionPool:
    """Process-wide loaded runtimes keyed by (model digest, threads), reference counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], tuple[Any, int]] = {}
        self.loads = 0  # real engine loads, for tests and the benchmark

    def acquire(self, model_path: Path, manifest: Manifest, threads: int) -> _PooledRuntime:
        key = (manifest.model_digest, threads)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries[key] = (entry[0], entry[1] + 1)
                return _PooledRuntime(self, key, entry[0])
        loaded = load_model(model_path, manifest, threads=threads)  # outside the lock: may be slow
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:  # another device loaded it meanwhile
                self._entries[key] = (entry[0], entry[1] + 1)
                loaded.close()
                return _PooledRuntime(self, key, entry[0])
            self.loads += 1
            self._entries[key] = (loaded.runtime, 1)
            return _PooledRuntime(self, key, loaded.runtime)

    def release(self, key: tuple[str, int]) -> None:
        with self._lock:
            runtime, refs = self._entries[key]
            if refs > 1:
                self._entries[key] = (runtime, refs - 1)
                return
            del self._entries[key]
        runtime.close()

    def __len__(self) -> int:
        return len(self._entries)


SESSION_POOL = _SessionPool()


class SharedModelCatalog(ModelCatalog):
    """The daemon's catalog, loading through the process's session pool and the device's runtimes."""

    def __init__(self, threads: int, runtimes: tuple[str, ...], pool: _SessionPool = SESSION_POOL) -> None:
        super().__init__(threads)
        self.runtimes = runtimes
        self.pool = pool

    def load(self, model_path: Path, manifest: Manifest, threads: int) -> LoadedModel:
        if manifest.runtime not in self.runtimes:
            raise RuntimeFailure(
                f"runtime {manifest.runtime!r} is not available on this device "
                f"(has {', '.join(self.runtimes)})"
            )
        runtime = self.pool.acquire(model_path, manifest, threads)
        model = LoadedModel(runtime, manifest, model_path)  # type: ignore[arg-type]
        bid = f"{manifest.name}-{manifest.version}"
        self.manifests[bid] = manifest
        self.infos[bid] = dict(model.info())
        return model


class _ThrottledTrust:
    """The device's trust client, with at most N downloads at once per worker process.

    On a real fleet every device has its own CPU; in the swarm hundreds of devices share two
    cores, and hundreds of simultaneous TUF refreshes and chunk fetches only thrash the GIL
    until timeouts fire. Queuing them keeps each device's work what it would be on its own
    hardware (the order of installs changes, not their content or their checks).
    """

    def __init__(self, trust: Any, gate: threading.BoundedSemaphore) -> None:
        self._trust, self._gate = trust, gate

    def download_target(self, target_path: str, expected: Any = None) -> Path:
        with self._gate:
            return self._trust.download_target(target_path, expected)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trust, name)


DOWNLOAD_GATE = threading.BoundedSemaphore(8)


class SwarmAgent(AgentDaemon):
    """The real agent on a `SwarmLoop` transport, reporting its profile's facts."""

    def __init__(self, config: AgentConfig, loop: SwarmLoop, profile: DeviceProfile) -> None:
        self.profile = profile
        transport = loop.transport(config.mqtt)
        catalog = SharedModelCatalog(config.model_threads, profile.runtimes)
        super().__init__(config, transport=transport, catalog=catalog)
        self.lifecycle.ctx.trust = _ThrottledTrust(self.lifecycle.ctx.trust, DOWNLOAD_GATE)
        if profile.clock_offset_s:  # what judges validity: director expiry and TUF metadata expiry
            clock = SkewedClock(timedelta(seconds=profile.clock_offset_s))
            self.trust.clock = clock
            self.gate.clock = clock

    def _start_ticker(self) -> threading.Thread | None:
        return None  # the worker's `SharedTicker` calls `tick()`: no thread per device

    def reported_state(self, record: Any = None, online: bool = True) -> ReportedState:
        state = super().reported_state(record, online)
        return state.model_copy(
            update={
                "agent_version": self.profile.agent_version,
                "runtimes": [_REPORTED_RUNTIME[r] for r in self.profile.runtimes],
                "memory_mb": self.profile.memory_mb,
            }
        )


class SharedTicker:
    """One thread that runs every device's `tick()` every `report_interval_s`, staggered.

    Why: an agent on a gateway has its own ticker thread; hundreds of devices in one process
    each waking their own thread turn every period into a GIL convoy that starves the
    worker's MQTT loop thread (measured: at 500 devices per worker the broker closed the
    silent connections). One thread ticking them in turn does the same work without the
    hand-offs. Each device keeps its own random phase; a slow tick only delays the others.
    """

    def __init__(self, agents: list[SwarmAgent], seed: int = 0, resolution_s: float = 0.05) -> None:
        rng = random.Random(seed)
        now = time.monotonic()
        self._due = [(now + a.config.report_interval_s * rng.random(), i) for i, a in enumerate(agents)]
        heapq.heapify(self._due)
        self._agents = agents
        self._resolution_s = resolution_s
        self.stop = threading.Event()
        self.ticks = 0

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            while self._due and self._due[0][0] <= now and not self.stop.is_set():
                _, i = heapq.heappop(self._due)
                agent = self._agents[i]
                if agent.ready.is_set() and not agent.stop_event.is_set():
                    agent.tick()
                    self.ticks += 1
                heapq.heappush(self._due, (now + agent.config.report_interval_s, i))
            wait = self._due[0][0] - time.monotonic() if self._due else self._resolution_s
            self.stop.wait(min(max(wait, 0.0), self._resolution_s * 20))


def agent_config(
    profile: DeviceProfile,
    *,
    state_dir: Path,
    bootstrap_root: Path,
    broker_host: str,
    broker_port: int,
    prefix: str,
    telemetry_interval_s: float = 2.0,
    overrides: dict[str, Any] | None = None,
) -> AgentConfig:
    """A swarm device's agent configuration: no local API, short timeouts, fast telemetry."""
    raw: dict[str, Any] = {
        "device_id": profile.device_id,
        "cohorts": [profile.cohort],
        "labels": {**profile.labels, "cohort": profile.cohort},
        "state_dir": str(state_dir),
        "bootstrap_root": str(bootstrap_root),
        "topic_prefix": prefix,
        "mqtt": {
            "host": broker_host,
            "port": broker_port,
            "client_id": profile.device_id,
            # long keepalive: a worker's loop thread may be starved for seconds on a loaded
            # machine, and a missed PINGREQ costs a reconnect of the whole device
            "keepalive_s": 120,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 3.0,
            "connect_timeout_s": 10.0,
        },
        "api": {"http_enabled": False, "unix_enabled": False},
        "limits": {"chunk_timeout_s": 5.0, "fetch_reconnect_wait_s": 30.0, "chunk_retries": 8},
        "lifecycle": {"retry_base_s": 1.0, "retry_max_s": 5.0, "load_timeout_s": 20.0},
        "telemetry_interval_s": telemetry_interval_s,
        "report_interval_s": 0.5,
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return AgentConfig.model_validate(raw)
