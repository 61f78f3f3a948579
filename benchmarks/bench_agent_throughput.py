"""Predictions per second through the agent's Unix socket with 1, 4 and 16 concurrent clients.

The server runs in its own process (as for applications on the gateway), serving the MLP
32-64-64-4 (onnxruntime, 1 thread) on EFB1 frames; the clients are threads of this process,
each with its own connection, batch 1, as fast as they can for a fixed time. The baseline,
measured in the same run before and after the clients, is raw `InferenceSession.run` in one
thread of this process: what a single application thread gets without any API at all.
The default client goes through the shared-memory channel where the agent offers it
(`agent.serving.shm_server`); beside it, in the same run: the same clients kept on the socket
(`_socket`, the fallback path), the server with micro-batching on (`_batched`: the socket's
event loop, and the shared-memory poller stacking ready channels into one run), and a bare
echo (one epoll thread, no framing, no model) driven by the same number of client threads,
the ceiling the socket and the client process set whatever the server does. Last, the 16
default clients once more with their threads kept to one CPU (`_pinned`): their spinners share
one core through the GIL anyway, and kept off the agent's core they stop delaying its poller
by a scheduler tick (the p99 at 16 clients). The same 16 clients in C (`_c`, no GIL), and in C
kept to one CPU (`_c_pinned`): the agent then has the other CPU to itself, so that figure is
what the agent's serving thread delivers when the clients cost it nothing, the agent's own
capacity on this machine. The servers above serve the bare model; `_daemon` is the path the
agent daemon serves (`benchmarks.daemon_fixture`: the lifecycle's holder, telemetry folded for
every request and a prediction id per row), at 1 and 16 clients, and with micro-batching on
at 16 (`_daemon_batched`: stacked runs fold their telemetry once a run); `_one_spinner` is the
default 16 clients with `shm_one_spinner=True` (one waiting thread spins for all). For the default 16 clients
the CPU both processes spent per prediction is read from /proc (`*_server_cpu_us_per_call`,
`*_client_cpu_us_per_call`): both include spinning (a poller and clients that wait by
spinning use a whole CPU whatever the rate), so they show where the CPUs go, not what a prediction needs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.daemon_fixture import daemon_path
from benchmarks.proc_cpu import read_cpu_s

NAME = "agent_throughput"
DESCRIPTION = "predictions/s over the Unix socket at 1/4/16 clients vs raw session.run in one thread"

SECONDS = 1.5
CLIENTS = (1, 4, 16)
ROOT = Path(__file__).resolve().parents[1]


def serve(directory: str) -> None:
    """Server process: the agent's Unix server over the MLP, as configured by default
    (`agent.sock`, a thread per connection) and with micro-batching on (`batched.sock`)."""
    from agent.runtimes import load_model
    from agent.serving.api import ApiLimits
    from agent.serving.batch_run import BatchConfig
    from agent.serving.unix_server import UnixInferenceServer
    from simulators.models import make_mlp_onnx, mlp_manifest

    d = Path(directory)
    data = make_mlp_onnx(0)
    (d / "model.onnx").write_bytes(data)
    model = load_model(d / "model.onnx", mlp_manifest(data))
    UnixInferenceServer(model, d / "agent.sock", ApiLimits(max_connections=64)).start()
    UnixInferenceServer(model, d / "batched.sock", ApiLimits(max_connections=64),
                        batching=BatchConfig()).start()
    served, tap = daemon_path(d, data)  # what the agent daemon serves: holder, telemetry, ids
    UnixInferenceServer(served, d / "daemon.sock", ApiLimits(max_connections=64), feedback=tap).start()
    UnixInferenceServer(served, d / "daemon_batched.sock", ApiLimits(max_connections=64), feedback=tap,
                        batching=BatchConfig()).start()
    threading.Thread(target=_bare_echo, args=(d / "bare.sock",), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()


def _bare_echo(path: Path) -> None:
    """The transport's ceiling: one thread echoing every connection's bytes (epoll), no framing."""
    import selectors
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is listener:
                conn, _ = listener.accept()
                sel.register(conn, selectors.EVENT_READ)
                continue
            data = sock.recv(65536)  # type: ignore[union-attr]
            if data:
                sock.sendall(data)  # type: ignore[union-attr]
            else:
                sel.unregister(sock)
                sock.close()  # type: ignore[union-attr]


def _bare_clients(path: Path, k: int) -> float:
    """Round trips/s of `k` threads each echoing a 200-byte message (about a batch-1 request)."""
    import socket

    counts = [0] * k
    start, stop = threading.Barrier(k + 1), threading.Event()

    def worker(i: int) -> None:
        frame = b"\0" * 200
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            start.wait()
            n = 0
            while not stop.is_set():
                s.sendall(frame)
                got = 0
                while got < len(frame):
                    got += len(s.recv(65536))
                n += 1
            counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def _raw_rate(session: object, x: np.ndarray) -> float:
    run = session.run  # type: ignore[attr-defined]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS:
        for _ in range(100):
            run(None, {"x": x})
        n += 100
    return n / (time.perf_counter() - t0)


@dataclass
class CpuWindow:
    """CPU seconds of `pids` at the start and the end of the measured window, and how many
    predictions the clients made in it."""

    pids: list[int]
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    calls: int = 0

    def us_per_call(self, i: int) -> float:
        return (self.after[i] - self.before[i]) / max(self.calls, 1) * 1e6


def _clients(path: Path, k: int, x: np.ndarray, transport: str, cpu: int | None = None,
             meter: CpuWindow | None = None, one_spinner: bool = False) -> tuple[float, list[int]]:
    """Predictions/s and latencies (ns) of `k` client threads; `cpu`: each thread keeps to
    that CPU (`sched_setaffinity` of the thread itself), as an application confined to one
    core would. `meter`: filled with its processes' CPU over the measured window."""
    from agent.inference_client import InferenceClient

    counts = [0] * k
    latencies: list[list[int]] = [[] for _ in range(k)]
    start, stop = threading.Barrier(k + 1), threading.Event()

    def worker(i: int) -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # pid 0: this thread only
        clock = time.perf_counter_ns
        with InferenceClient(path, transport=transport, shm_one_spinner=one_spinner) as client:
            client.predict({"x": x})
            start.wait()
            lat = latencies[i]
            while not stop.is_set():
                t0 = clock()
                client.predict({"x": x})
                lat.append(clock() - t0)
            counts[i] = len(lat)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    pids = meter.pids if meter is not None else []
    start.wait()
    before = [read_cpu_s(pid) or 0.0 for pid in pids]
    t0 = time.perf_counter()
    time.sleep(SECONDS)
    stop.set()
    after = [read_cpu_s(pid) or 0.0 for pid in pids]
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if meter is not None:
        meter.before, meter.after, meter.calls = before, after, sum(counts)
    return sum(counts) / elapsed, [v for lat in latencies for v in lat]


C_CLIENT = Path(__file__).resolve().parent / "c" / "efs1_client.c"


def build_c_client(out_dir: Path) -> Path | None:
    """Compile the C client (benchmarks/c/efs1_client.c) into `out_dir`; None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = out_dir / "efs1_client"
    subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(C_CLIENT)], check=True, timeout=120)
    return exe


def _c_clients(exe: Path, path: Path, k: int, cpu: int | None = None) -> float:
    """Predictions/s of `k` threads of the C client, each on its own channel (no GIL); with
    `cpu`, the client process is kept to that CPU."""
    seconds = max(1, round(SECONDS))
    cmd = [str(exe), str(path), "x", "32", str(k), str(seconds)]
    if cpu is not None:
        cmd = [shutil.which("taskset") or "taskset", "-c", str(cpu), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 30)
    doc = json.loads(done.stdout)
    if doc["errors"]:
        raise RuntimeError(f"the C client got error frames: {doc['error']}")
    return float(doc["calls"]) / float(doc["seconds"])


def run() -> dict[str, float]:
    import onnxruntime as ort

    from simulators.models import make_mlp_onnx

    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ef-tput-", dir="/tmp") as tmp:
        d = Path(tmp)
        (d / "local.onnx").write_bytes(make_mlp_onnx(0))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1  # as the agent's OnnxRuntime
        session = ort.InferenceSession(str(d / "local.onnx"), opts, providers=["CPUExecutionProvider"])
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from benchmarks.bench_agent_throughput import serve; serve({tmp!r})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            raw = [_raw_rate(session, x)]
            for k in CLIENTS:
                for sock, transport, tag in (("agent.sock", "auto", ""),
                                             ("agent.sock", "socket", "_socket"),
                                             ("batched.sock", "auto", "_batched")):
                    meter = CpuWindow([proc.pid, os.getpid()]) if (k, tag) == (CLIENTS[-1], "") else None
                    rate, lat = _clients(d / sock, k, x, transport, meter=meter)
                    if meter is not None:  # CPU of the agent and of the client process per prediction
                        out[f"agent_throughput_{k}_clients_server_cpu_us_per_call"] = meter.us_per_call(0)
                        out[f"agent_throughput_{k}_clients_client_cpu_us_per_call"] = meter.us_per_call(1)
                    out[f"agent_throughput_{k}_clients{tag}_per_s"] = rate
                    out[f"agent_throughput_{k}_clients{tag}_p99_us"] = float(np.percentile(lat, 99)) / 1000.0
                out[f"bare_echo_{k}_clients_per_s"] = _bare_clients(d / "bare.sock", k)
            rate, lat = _clients(d / "agent.sock", CLIENTS[-1], x, "auto", one_spinner=True)
            out[f"agent_throughput_{CLIENTS[-1]}_clients_one_spinner_per_s"] = rate
            out[f"agent_throughput_{CLIENTS[-1]}_clients_one_spinner_p99_us"] = (
                float(np.percentile(lat, 99)) / 1e3)
            for k in (1, CLIENTS[-1]):  # the daemon's path: telemetry folded, an id per row
                rate, lat = _clients(d / "daemon.sock", k, x, "auto")
                out[f"agent_throughput_{k}_clients_daemon_per_s"] = rate
                out[f"agent_throughput_{k}_clients_daemon_p99_us"] = float(np.percentile(lat, 99)) / 1e3
            rate, lat = _clients(d / "daemon_batched.sock", CLIENTS[-1], x, "auto")
            out[f"agent_throughput_{CLIENTS[-1]}_clients_daemon_batched_per_s"] = rate
            out[f"agent_throughput_{CLIENTS[-1]}_clients_daemon_batched_p99_us"] = (
                float(np.percentile(lat, 99)) / 1e3)
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) >= 2:  # the client threads on one CPU, the agent free to use the others
                top = CLIENTS[-1]
                rate, lat = _clients(d / "agent.sock", top, x, "auto", cpu=cpus[-1])
                out[f"agent_throughput_{top}_clients_pinned_per_s"] = rate
                out[f"agent_throughput_{top}_clients_pinned_p99_us"] = float(np.percentile(lat, 99)) / 1e3
            exe = build_c_client(d)
            if exe is not None:  # the same 16 clients in C: what the agent serves without a GIL'd client
                for sock, tag in (("agent.sock", "_c"), ("batched.sock", "_c_batched")):
                    out[f"agent_throughput_{CLIENTS[-1]}_clients{tag}_per_s"] = _c_clients(
                        exe, d / sock, CLIENTS[-1])
                if len(cpus) >= 2:
                    out[f"agent_throughput_{CLIENTS[-1]}_clients_c_pinned_per_s"] = _c_clients(
                        exe, d / "agent.sock", CLIENTS[-1], cpu=cpus[-1])
            raw.append(_raw_rate(session, x))
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=10)
    base = float(np.mean(raw))
    out["raw_run_one_thread_per_s"] = base
    top = CLIENTS[-1]
    for tag in ("_c", "_c_batched", "_c_pinned"):
        c_rate = out.get(f"agent_throughput_{top}_clients{tag}_per_s")
        if c_rate is not None:
            out[f"agent_throughput{tag}_vs_raw_ratio"] = c_rate / base
    out["agent_throughput_vs_raw_ratio"] = out[f"agent_throughput_{CLIENTS[-1]}_clients_per_s"] / base
    out["agent_throughput_daemon_vs_raw_ratio"] = out[f"agent_throughput_{top}_clients_daemon_per_s"] / base
    out["agent_throughput_daemon_batched_vs_raw_ratio"] = (
        out[f"agent_throughput_{top}_clients_daemon_batched_per_s"] / base)
    out["agent_throughput_socket_vs_raw_ratio"] = (
        out[f"agent_throughput_{CLIENTS[-1]}_clients_socket_per_s"] / base
    )
    out["agent_throughput_batched_vs_raw_ratio"] = (
        out[f"agent_throughput_{CLIENTS[-1]}_clients_batched_per_s"] / base
    )
    # The same clients through a bare echo (no model, no framing): what the socket itself allows.
    out["bare_echo_vs_raw_ratio"] = out[f"bare_echo_{CLIENTS[-1]}_clients_per_s"] / base
    out["agent_throughput_batched_vs_bare_echo_ratio"] = (
        out[f"agent_throughput_{top}_clients_batched_per_s"] / out[f"bare_echo_{top}_clients_per_s"]
    )
    return out
