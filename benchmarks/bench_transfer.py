"""Bundle delivery over MQTT: one 10 MiB object to 200 agents through a private Mosquitto.

Agents are real `MqttFetcher`s (each with its own paho client) spread over a few processes;
the fleet `Publisher` serves them from a repository directory. Baseline in the same run: one
agent alone. Metrics: time until every agent holds bytes whose sha256 matches
(`transfer_s`); bytes the broker delivered per agent over the file size
(`transfer_bytes_ratio`, mean, and `_max`; counted at the MQTT client, so chunk headers and
duplicates count); broker peak RSS sampled from /proc during the fleet run.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

NAME = "transfer"
DESCRIPTION = "10 MiB bundle to 200 MqttFetcher agents via Mosquitto (vs one agent alone)"

SIZE = 10 * 1024 * 1024
AGENTS = 200
PROCESSES = 4
PREFIX = "bench"
TARGET = "targets/models/bundle.efb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000\nlog_type error\n"
    )
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _agents(
    port: int, ids: list[str], spool: str, digest: str, go: MpEvent | None, out: Any
) -> list[tuple[bool, int, float]]:
    """Connect `ids`, wait for `go`, fetch concurrently; returns (ok, bytes_received, seconds) each."""
    from agent.contract.protocol import Topics
    from agent.transport.mqtt_client import MqttTransport
    from agent.transport.mqtt_config import MqttConfig
    from agent.transport.mqtt_fetcher import FetcherConfig, MqttFetcher

    transports = [MqttTransport(MqttConfig(port=port, client_id=i, connect_timeout_s=60)) for i in ids]
    for t in transports:
        t.connect()
    fetchers = [
        MqttFetcher(t, Topics(PREFIX, i), Path(spool) / i, FetcherConfig(chunk_timeout_s=30))
        for t, i in zip(transports, ids, strict=True)
    ]
    results: list[tuple[bool, int, float]] = [(False, 0, 0.0)] * len(ids)
    if out is not None:
        out.put(("ready", len(ids)))
    if go is not None:
        go.wait()

    def one(k: int) -> None:
        t0 = time.perf_counter()
        try:
            data = fetchers[k].download_bytes(f"mqtt://repo/{TARGET}", SIZE)
            ok = hashlib.sha256(data).hexdigest() == digest
        except Exception:
            ok = False
        # Everything the broker delivered to this agent (chunk headers and duplicates included).
        results[k] = (ok, transports[k].bytes_in, time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(ids))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in transports:
        t.close()
    return results


def _worker(port: int, ids: list[str], spool: str, digest: str, go: MpEvent, out: Any) -> None:
    out.put(("done", _agents(port, ids, spool, digest, go, out)))


def run() -> dict[str, float]:
    from agent.transport.mqtt_config import MqttConfig
    from fleet.delivery.publisher import Publisher, PublisherSettings

    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    broker, port = _start_broker(work)
    try:
        repo = work / "repo"
        (repo / "targets" / "models").mkdir(parents=True)
        data = os.urandom(SIZE)
        (repo / TARGET).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        publisher = Publisher(
            MqttConfig(port=port, client_id="bench-publisher", max_inflight=200),
            PREFIX,
            repo,
            PublisherSettings(bytes_per_s=0, workers=2, max_pending_per_device=8),
        )
        publisher.start()
        try:
            # Baseline: one agent alone, same broker, same publisher.
            t0 = time.perf_counter()
            single = _agents(port, ["solo"], str(work / "spool"), digest, None, None)
            single_s = time.perf_counter() - t0
            if not single[0][0]:
                raise RuntimeError("the single-agent baseline did not get verified bytes")

            ctx = mp.get_context("spawn")
            go = ctx.Event()
            out = ctx.Queue()
            ids = [f"agent-{k:04d}" for k in range(AGENTS)]
            procs = [
                ctx.Process(
                    target=_worker, args=(port, ids[p::PROCESSES], str(work / "spool"), digest, go, out)
                )
                for p in range(PROCESSES)
            ]
            for p in procs:
                p.start()
            ready = 0
            while ready < AGENTS:
                kind, n = out.get(timeout=120)
                if kind == "ready":
                    ready += n
            peak = [_rss_mb(broker.pid)]
            rss_idle = peak[0]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.05):
                    peak[0] = max(peak[0], _rss_mb(broker.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            go.set()
            results: list[tuple[bool, int, float]] = []
            for _ in procs:
                kind, res = out.get(timeout=600)
                results.extend(res)
            transfer_s = time.perf_counter() - t0
            stop.set()
            sampler.join()
            for p in procs:
                p.join(timeout=30)
        finally:
            publisher.stop()
        ok = sum(1 for r in results if r[0])
        ratios = [r[1] / SIZE for r in results]
        return {
            "transfer_s": transfer_s,
            "transfer_single_s": single_s,
            "transfer_agents_verified": float(ok),
            "transfer_agents": float(AGENTS),
            "transfer_bytes_ratio": sum(ratios) / len(ratios),
            "transfer_bytes_ratio_max": max(ratios),
            "transfer_throughput_mib_s": ok * SIZE / transfer_s / 2**20,
            "broker_idle_rss_mb": rss_idle,
            "broker_peak_rss_mb": peak[0],
            "publisher_refused_429": float(publisher.refused[429]),
        }
    finally:
        broker.terminate()
        broker.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
