"""What runs inside one swarm worker process: its devices, their ticker, the traffic thread, and
the loop that answers the controller (`simulators.swarm.Swarm`) over a pipe.

Kept apart from `simulators.swarm` because this side is everything a worker holds (real
`AgentDaemon`s on one `SwarmLoop`, data generators, ground-truth scoring) and the controller
holds none of it: it only spawns workers with `worker_main` and sends them commands (`stats`,
`drift`, `quality`, `traffic`, `stop`). A worker SIGKILLed by `kill_worker` loses nothing but
its processes; a new one started on the same state directories resumes from the state records.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from agent.logs import configure_logging
from simulators.datagen import DataGenerator, DriftSpec, device_seed
from simulators.device_keys import install_sim_key
from simulators.models import mlp_reference, mlp_weights
from simulators.swarm_device import SESSION_POOL, DeviceProfile, SharedTicker, SwarmAgent, agent_config
from simulators.swarm_loop import SwarmLoop
from simulators.swarm_records import SwarmSpec, WorkerStats

THREAD_STACK_BYTES = 512 * 1024


def raise_nofile_limit(wanted: int) -> int:
    """Raise this process's open-file soft limit towards `wanted` (capped by the hard limit).

    Each client holds one socket; returns the new soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class Traffic:
    """Feeds every serving device a batch per interval (drift applied by cohort and time)."""

    def __init__(self, spec: SwarmSpec, agents: list[Any], t0: float) -> None:
        self.spec = spec
        self.agents = agents
        self.t0 = t0
        self.enabled = threading.Event()
        if spec.traffic:
            self.enabled.set()
        self.stop = threading.Event()
        self.schema = spec.schema
        self.gens = {
            a.profile.device_id: DataGenerator(
                spec.schema, a.profile.cohort, device_seed(spec.seed, a.profile.device_id)
            )
            for a in agents
        }
        self.predictions = 0
        self.truth = mlp_weights(spec.truth_seed) if spec.truth_seed is not None else None
        self.quality: dict[str, list[float]] = {}
        self.cohort_quality: dict[str, list[float]] = {}  # "<cohort>/<bundle>" -> batch accuracies
        self._lock = threading.Lock()

    def take_quality(self, by_cohort: bool = False) -> dict[str, list[float]]:
        with self._lock:
            if by_cohort:
                out, self.cohort_quality = self.cohort_quality, {}
            else:
                out, self.quality = self.quality, {}
        return out

    def _score(self, bundle: str, x: np.ndarray, out: dict[str, np.ndarray], cohort: str = "") -> None:
        assert self.truth is not None
        labels = np.argmax(mlp_reference(x, self.truth), axis=1)
        served = np.argmax(next(iter(out.values())), axis=1)
        accuracy = float(np.mean(served == labels))
        with self._lock:
            self.quality.setdefault(bundle, []).append(accuracy)
            self.cohort_quality.setdefault(f"{cohort}/{bundle}", []).append(accuracy)

    def set_drifts(self, drifts: Sequence[DriftSpec]) -> None:
        self.schema = self.schema.with_drifts(*drifts)
        for g in self.gens.values():
            g.schema = self.schema

    def run(self) -> None:
        while not self.stop.wait(self.spec.traffic_interval_s):
            if not self.enabled.is_set():
                continue
            t = time.monotonic() - self.t0
            for a in self.agents:
                if a.holder.bundle_id is None:
                    continue
                x = self.gens[a.profile.device_id].batch(self.spec.traffic_batch, t)
                bundle = a.holder.bundle_id
                try:
                    out = a.served.predict({"x": x})
                except Exception:  # noqa: S112 - a device mid-swap or unhealthy: not ours to fix
                    continue
                if a.tap.sample is not None and bundle is not None and len(out) == 1:
                    # no local API here, so no prediction ids (their ring would grow every device's
                    # memory): offer the rows to a signed collection policy as the API does, unlabelled
                    a.tap.sample(bundle, x, next(iter(out.values())), None)
                self.predictions += 1
                if self.truth is not None and bundle is not None:
                    self._score(bundle, x, out, a.profile.cohort)


def worker_main(index: int, conn: Connection, spec: SwarmSpec, profiles: list[DeviceProfile]) -> None:
    """A worker process: build the devices, run them, answer the controller until `stop`."""
    # Beside a progress view the parent logs to a file (simulators.progress); so do its workers.
    configure_logging(level=os.environ.get("EDGEFLEET_SWARM_LOG", "ERROR"),
                      path=os.environ.get("EDGEFLEET_SWARM_LOG_FILE") or None)
    threading.stack_size(THREAD_STACK_BYTES)
    raise_nofile_limit(len(profiles) * 6 + 256)
    base_rss = _rss_mb()
    started = time.monotonic()
    loop = SwarmLoop(seed=spec.seed + index).start()
    agents: list[SwarmAgent] = []
    for p in profiles:
        cfg = agent_config(
            p,
            state_dir=spec.state_root / p.device_id,
            bootstrap_root=spec.bootstrap_root,
            broker_host=spec.broker_host,
            broker_port=spec.broker_port,
            prefix=spec.prefix,
            telemetry_interval_s=spec.telemetry_interval_s,
            overrides=spec.agent_overrides,
        )
        install_sim_key(cfg.state_dir, p.device_id)  # signs its reports (issue 14)
        agent = SwarmAgent(cfg, loop, p)
        threading.Thread(target=agent.run, name=f"agent-{p.device_id}", daemon=True).start()
        agents.append(agent)
    ticker = SharedTicker(agents, seed=spec.seed + index)
    ticker_thread = threading.Thread(target=ticker.run, name="swarm-ticker", daemon=True)
    ticker_thread.start()
    traffic = Traffic(spec, agents, started)
    threading.Thread(target=traffic.run, name="traffic", daemon=True).start()
    setup_s = time.monotonic() - started

    def stats() -> WorkerStats:
        s = loop.stats()
        return WorkerStats(
            index,
            os.getpid(),
            len(agents),
            s.connected,
            _rss_mb(),
            base_rss,
            len(SESSION_POOL),
            SESSION_POOL.loads,
            traffic.predictions,
            setup_s,
        )

    conn.send(("ready", stats()))
    while True:
        try:
            cmd, arg = conn.recv()
        except (EOFError, OSError):
            cmd, arg = "stop", None
        if cmd == "stats":
            conn.send(("ok", stats()))
        elif cmd == "drift":
            traffic.set_drifts(arg)
            conn.send(("ok", None))
        elif cmd == "quality":
            conn.send(("ok", traffic.take_quality(bool(arg))))
        elif cmd == "traffic":
            (traffic.enabled.set if arg else traffic.enabled.clear)()
            conn.send(("ok", None))
        elif cmd == "stop":
            traffic.stop.set()
            ticker.stop.set()
            ticker_thread.join(10)  # no tick while the agents close their queues
            for a in agents:
                a.stop()
            deadline = time.monotonic() + 10
            for t in threading.enumerate():
                if t.name.startswith("agent-"):
                    t.join(max(0.0, deadline - time.monotonic()))
            loop.stop()
            with contextlib.suppress(OSError):
                conn.send(("ok", None))
            return
