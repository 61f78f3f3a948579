"""What the local inference API adds on top of `session.run`, per transport, against echo baselines.

The servers run in a separate process (as for a real application on the gateway). In the
same run we measure: raw `InferenceSession.run` (batch 1), the agent's Unix-socket and HTTP
APIs serving the model, the same server stacks with a no-op "echo" predictor, and a bare
Unix-socket echo (no framing) as the kernel/process wake-up floor. Targets are interleaved in
rounds so machine noise hits all of them alike; each figure is a median.

The default client (`InferenceClient`, transport "auto") uses the shared-memory channel where
the agent offers it (`agent.serving.shm_server`); `*_socket_*` figures are the same calls kept
on the socket (`transport="socket"`), the fallback path. Spinning trades CPU for latency, so
the CPU both processes spent per request (`/proc/<pid>/schedstat` of the server, this process's
own CPU time) is reported beside each round trip.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.daemon_fixture import daemon_path

NAME = "agent_overhead"
DESCRIPTION = "local inference API round trip minus raw session.run (MLP 32-64-64-4, batch 1), Unix and HTTP"

ROUNDS = 12
PER_ROUND = 150
ROOT = Path(__file__).resolve().parents[1]


class EchoPredictor:
    """No-op handler: returns the input as the output, so only the server stack is timed."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"logits": inputs["x"]}

    def info(self) -> dict[str, Any]:
        return {
            "name": "echo",
            "version": "0.0.0",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 32]}],
        }


def serve(directory: str) -> None:
    """Server process: agent and echo servers on both transports plus a bare socket echo."""
    import threading

    from agent.runtimes import load_model
    from agent.serving.batch_run import BatchConfig
    from agent.serving.http_server import HttpInferenceServer
    from agent.serving.unix_server import UnixInferenceServer
    from simulators.models import make_mlp_onnx, mlp_manifest

    d = Path(directory)
    data = make_mlp_onnx(0)
    (d / "model.onnx").write_bytes(data)
    model = load_model(d / "model.onnx", mlp_manifest(data))
    UnixInferenceServer(model, d / "agent.sock").start()
    UnixInferenceServer(model, d / "batched.sock", batching=BatchConfig()).start()
    served, tap = daemon_path(d, data)
    UnixInferenceServer(served, d / "daemon.sock", feedback=tap).start()
    UnixInferenceServer(EchoPredictor(), d / "echo.sock").start()
    http_agent = HttpInferenceServer(model).start()
    http_echo = HttpInferenceServer(EchoPredictor()).start()
    bare = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bare.bind(str(d / "bare.sock"))
    bare.listen(1)

    def bare_echo() -> None:
        conn, _ = bare.accept()
        while data := conn.recv(65536):
            conn.sendall(data)

    threading.Thread(target=bare_echo, daemon=True).start()
    print(http_agent.port, http_echo.port, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin


def _timed(fn: Callable[[], object], n: int, sink: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        sink.append(clock() - t0)


def _cpu_ns(pid: int) -> int:
    """CPU time of process `pid` so far, in ns (`/proc/<pid>/schedstat`, all its threads)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def run() -> dict[str, float]:
    import onnxruntime as ort

    from agent.inference_client import POLLING_SPIN_US
    from agent.serving.client import HttpInferenceClient, UnixInferenceClient
    from simulators.models import make_mlp_onnx

    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="ef-bench-", dir="/tmp") as tmp:
        d = Path(tmp)
        data = make_mlp_onnx(0)
        (d / "local.onnx").write_bytes(data)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1  # as the agent's OnnxRuntime
        session = ort.InferenceSession(str(d / "local.onnx"), opts, providers=["CPUExecutionProvider"])
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from benchmarks.bench_agent_overhead import serve; serve({tmp!r})"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            http_agent_port, http_echo_port = (int(p) for p in proc.stdout.readline().split())
            ua, ue = UnixInferenceClient(d / "agent.sock"), UnixInferenceClient(d / "echo.sock")
            ub, ud = UnixInferenceClient(d / "batched.sock"), UnixInferenceClient(d / "daemon.sock")
            us = UnixInferenceClient(d / "agent.sock", transport="socket")
            ues = UnixInferenceClient(d / "echo.sock", transport="socket")
            up = UnixInferenceClient(d / "agent.sock", spin_us=POLLING_SPIN_US, transport="socket")
            ha, he = HttpInferenceClient(port=http_agent_port), HttpInferenceClient(port=http_echo_port)
            bare = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bare.connect(str(d / "bare.sock"))
            frame = b"\0" * 200  # about the size of a framed batch-1 request

            def bare_rtt() -> None:
                bare.sendall(frame)
                got = 0
                while got < len(frame):
                    got += len(bare.recv(65536))

            def bare_rtt_polling() -> None:  # the same, polling for the reply as our client does
                bare.sendall(frame)
                got = 0
                while got < len(frame):
                    try:
                        got += len(bare.recv(65536, socket.MSG_DONTWAIT))
                    except BlockingIOError:
                        continue

            targets: dict[str, Callable[[], object]] = {
                "raw_run": lambda: session.run(None, {"x": x}),
                "unix_agent": lambda: ua.predict({"x": x}),
                "unix_agent_socket": lambda: us.predict({"x": x}),
                "unix_echo_socket": lambda: ues.predict({"x": x}),
                "unix_agent_polling": lambda: up.predict({"x": x}),
                "unix_batched": lambda: ub.predict({"x": x}),
                "unix_daemon": lambda: ud.predict({"x": x}),
                "unix_echo": lambda: ue.predict({"x": x}),
                "bare_socket_echo": bare_rtt,
                "bare_socket_echo_polling": bare_rtt_polling,
                "http_agent": lambda: ha.predict({"x": x}),
                "http_echo": lambda: he.predict({"x": x}),
                "http_npy_agent": lambda: ha.predict_npy(x),
                "http_npy_echo": lambda: he.predict_npy(x),
            }
            samples: dict[str, list[int]] = {k: [] for k in targets}
            cpu: dict[str, int] = dict.fromkeys(targets, 0)
            for fn in targets.values():  # warm up connections, caches and the model
                _timed(fn, 200, [])
            for _ in range(ROUNDS):
                for name, fn in targets.items():
                    c0 = _cpu_ns(proc.pid) + time.process_time_ns()
                    _timed(fn, PER_ROUND, samples[name])
                    cpu[name] += _cpu_ns(proc.pid) + time.process_time_ns() - c0
            if not ud.last_prediction_ids:
                raise RuntimeError("the daemon path recorded no prediction ids")
            on_shm = ua.on_shared_memory
            for c in (ua, ue, us, ues, up, ub, ud, ha, he):
                c.close()
            bare.close()
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=10)
    med = {k: float(np.median(v)) / 1000.0 for k, v in samples.items()}
    floor = med["bare_socket_echo"] + med["raw_run"]
    per_call = {k: cpu[k] / 1000.0 / (ROUNDS * PER_ROUND) for k in cpu}
    return {
        # The default client's path: 1.0 when it went through shared memory (x86-64 Linux).
        "agent_unix_on_shm": 1.0 if on_shm else 0.0,
        "agent_unix_socket_rtt_us": med["unix_agent_socket"],
        "agent_unix_socket_vs_floor_ratio": med["unix_agent_socket"] / floor,
        "agent_unix_socket_p99_us": float(np.percentile(samples["unix_agent_socket"], 99)) / 1000.0,
        "echo_unix_socket_rtt_us": med["unix_echo_socket"],
        # CPU both processes spent per call (spinning is paid in CPU), same calls as the medians.
        "agent_unix_cpu_us_per_call": per_call["unix_agent"],
        "agent_unix_socket_cpu_us_per_call": per_call["unix_agent_socket"],
        "bare_socket_echo_cpu_us_per_call": per_call["bare_socket_echo"],
        "raw_run_us": med["raw_run"],
        "agent_unix_rtt_us": med["unix_agent"],
        "echo_unix_rtt_us": med["unix_echo"],
        "bare_socket_echo_us": med["bare_socket_echo"],
        "agent_overhead_unix_us": med["unix_agent"] - med["raw_run"],
        "agent_unix_vs_echo_ratio": med["unix_agent"] / med["unix_echo"],
        # The physical floor of a local call: one socket round trip plus the model itself.
        "agent_unix_vs_floor_ratio": med["unix_agent"] / (med["bare_socket_echo"] + med["raw_run"]),
        "bare_socket_echo_polling_us": med["bare_socket_echo_polling"],
        "agent_unix_polling_rtt_us": med["unix_agent_polling"],
        "agent_unix_polling_p99_us": float(np.percentile(samples["unix_agent_polling"], 99)) / 1000.0,
        "agent_unix_polling_vs_polling_floor_ratio": med["unix_agent_polling"]
        / (med["bare_socket_echo_polling"] + med["raw_run"]),
        "agent_unix_p99_us": float(np.percentile(samples["unix_agent"], 99)) / 1000.0,
        # The micro-batching loop at one client (what it costs when there is nothing to batch)
        # and the daemon's path (holder, telemetry tap, one prediction id per row) on threads.
        "agent_unix_batched_rtt_us": med["unix_batched"],
        "agent_unix_batched_vs_floor_ratio": med["unix_batched"] / (med["bare_socket_echo"] + med["raw_run"]),
        "agent_unix_batched_p99_us": float(np.percentile(samples["unix_batched"], 99)) / 1000.0,
        "agent_unix_daemon_rtt_us": med["unix_daemon"],
        "agent_unix_daemon_vs_floor_ratio": med["unix_daemon"] / (med["bare_socket_echo"] + med["raw_run"]),
        "agent_unix_daemon_p99_us": float(np.percentile(samples["unix_daemon"], 99)) / 1000.0,
        "raw_run_p99_us": float(np.percentile(samples["raw_run"], 99)) / 1000.0,
        "bare_socket_echo_p99_us": float(np.percentile(samples["bare_socket_echo"], 99)) / 1000.0,
        "agent_http_rtt_us": med["http_agent"],
        "echo_http_rtt_us": med["http_echo"],
        "agent_overhead_http_us": med["http_agent"] - med["raw_run"],
        "agent_overhead_http_npy_us": med["http_npy_agent"] - med["raw_run"],
        "echo_http_npy_rtt_us": med["http_npy_echo"],
    }
