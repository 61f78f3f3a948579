"""Memory and cold start of the whole agent against a bare onnxruntime process with the same model.

The agent runs as it would on a device (`python -m agent.cli agent run --config ...`): a private
Mosquitto, a fleet-side repository, director signer and publisher in this process; the agent is
provisioned once with the MLP bundle over MQTT, then measured:

- RSS (VmRSS from /proc) of the agent serving the MLP after 200 warm-up predictions over its
  Unix socket, local HTTP and Unix APIs up, MQTT connected (reported online), against the RSS of
  a bare Python process that only imports onnxruntime + numpy, loads the same model file and ran
  the same 200 predictions;
- the RSS of the provisioning agent right after it committed the bundle (same process that
  verified the director document and downloaded through TUF): python-tuf, securesystemslib and
  cryptography are imported at the first update cycle, not at start, so this is what an agent
  carries after an update until its next restart (reported beside the idle figure, not hidden);
- the RSS of the same idle agent once its state directory holds a device report key, as on an
  enrolled device (`edgefleet agent enroll` makes one): it signs every report with Ed25519
  (docs/trust.md), so cryptography is loaded at start (`agent_rss_signed_over_bare_mb`, beside
  the unkeyed figure: the bare baseline signs nothing, and this cost is not hidden);
- cold start: from process spawn to the first successful prediction over the Unix socket,
  against the bare process's spawn to its first `session.run` result (import + load + run).

Each cold start is the median of `ROUNDS` spawns, alternating agent and bare.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "agent_footprint"
DESCRIPTION = "agent RSS over a bare onnxruntime process with the same MLP; cold start to first prediction"

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3
WARMUP = 200

BARE = """
import sys, time
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.inter_op_num_threads = 1
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
x = np.ones((1, 32), np.float32)
sess.run(None, {"x": x})
print("ready", flush=True)
for _ in range(WARMUP):
    sess.run(None, {"x": x})
print("warm", flush=True)
time.sleep(3600)
""".replace("WARMUP", str(WARMUP))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for {pid}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def _wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.005)
    raise RuntimeError(f"timed out: {what}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _predict_once(sock: Path) -> bool:
    from agent.serving.client import UnixInferenceClient

    client = UnixInferenceClient(sock, timeout=2.0)
    try:
        client.predict({"x": np.ones((1, 32), np.float32)})
        return True
    except Exception:
        return False
    finally:
        client.close()


def _idle_rss(agent: subprocess.Popen[bytes], sock: Path, online: dict[str, bool]) -> float:
    """VmRSS of a started agent after `WARMUP` predictions, once it reported itself online."""
    for _ in range(WARMUP):
        _predict_once(sock)
    _wait(lambda: online.get("bench-dev"), 30, "agent MQTT connected")
    time.sleep(0.5)
    return _rss_mb(agent.pid)


def run() -> dict[str, float]:
    from agent.contract.bundle import write_bundle
    from agent.daemon.report_signer import ensure_key
    from agent.transport.mqtt_config import MqttConfig
    from fleet.delivery.publisher import Publisher
    from fleet.trust.director_signer import DirectorSigner
    from fleet.trust.keys import KeyStore
    from fleet.trust.repository import Repository
    from simulators.models import make_mlp_onnx, mlp_manifest, mlp_reference, mlp_weights

    work = Path(tempfile.mkdtemp(prefix="efbench-"))
    broker, port = _start_broker(work)
    online: dict[str, bool] = {}
    active: dict[str, str | None] = {}
    lock = threading.Lock()
    try:
        keystore = KeyStore(work / "keys")
        repo = Repository(work / "repo", keystore)
        repo.init(root_threshold=1, root_keys=1)
        model = make_mlp_onnx(0)
        (work / "model.onnx").write_bytes(model)
        from agent.contract.manifest import GoldenVectors, HealthPolicy, Manifest

        manifest = mlp_manifest(model, version="1.0.0")
        # commit at once, on golden vectors alone (the benchmark sends no traffic in probation)
        fast = HealthPolicy(probation_requests=0, probation_seconds=0.0, traffic="none")
        x = np.ones((2, 32), np.float32)
        reference = mlp_reference(x, mlp_weights(0)).tolist()
        golden = GoldenVectors(inputs={"x": x.tolist()}, expected={"logits": reference})
        manifest = Manifest.model_validate(
            {**manifest.model_dump(), "health": fast.model_dump(), "golden": golden.model_dump()}
        )
        write_bundle(manifest, model, work / "mlp.efb")
        ref = repo.add_target(
            work / "mlp.efb", "models/mlp/mlp-1.0.0.efb", {"name": "mlp", "version": "1.0.0"}
        )
        publisher = Publisher(MqttConfig(port=port, client_id="bench-fleet"), "bench", repo.repo_dir)

        def on_reported(device: str, state: Any) -> None:
            with lock:
                online[device] = state.online
                active[device] = state.active_bundle if state.state == "idle" else None

        publisher.on_reported(on_reported)
        publisher.start()
        sock = work / "a.sock"
        config = {
            "device_id": "bench-dev",
            "state_dir": str(work / "state"),
            "topic_prefix": "bench",
            "bootstrap_root": str(repo.metadata_dir / "1.root.json"),
            "mqtt": {"port": port},
            "api": {"http_port": _free_port(), "unix_socket": str(sock)},
            "telemetry_interval_s": 60.0,
        }
        (work / "agent.json").write_text(json.dumps(config))
        cmd = [
            sys.executable,
            "-m",
            "agent.cli",
            "--log-level",
            "WARNING",
            "agent",
            "run",
            "--config",
            str(work / "agent.json"),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        def spawn_agent() -> subprocess.Popen[bytes]:
            with (work / "agent.log").open("ab") as log:
                return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)

        # provision: install the bundle over MQTT once
        agent = spawn_agent()
        director = DirectorSigner(keystore, work / "director").issue(ref, device_id="bench-dev")
        publisher.publish_desired(device_id="bench-dev", document=director)
        _wait(lambda: active.get("bench-dev") == "mlp-1.0.0", 60, "provisioning")
        time.sleep(0.5)
        installed_rss = _rss_mb(agent.pid)
        _stop(agent)

        agent_starts: list[float] = []
        bare_starts: list[float] = []
        agent_rss = bare_rss = signed_rss = 0.0
        for i in range(ROUNDS):
            with lock:
                online.pop("bench-dev", None)
            t0 = time.perf_counter()
            agent = spawn_agent()
            _wait(lambda: _predict_once(sock), 60, "agent first prediction")
            agent_starts.append(time.perf_counter() - t0)
            if i == ROUNDS - 1:
                agent_rss = _idle_rss(agent, sock, online)
            _stop(agent)

            t0 = time.perf_counter()
            bare = subprocess.Popen(
                [sys.executable, "-c", BARE, str(work / "model.onnx")],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert bare.stdout is not None
            if bare.stdout.readline().strip() != b"ready":
                raise RuntimeError("bare process failed")
            bare_starts.append(time.perf_counter() - t0)
            bare.stdout.readline()  # warm
            time.sleep(0.5)
            bare_rss = _rss_mb(bare.pid)
            bare.kill()
            bare.wait()
        ensure_key(work / "state")  # enrolled: every report is signed from now on
        with lock:
            online.pop("bench-dev", None)
        agent = spawn_agent()
        _wait(lambda: _predict_once(sock), 60, "signing agent first prediction")
        signed_rss = _idle_rss(agent, sock, online)
        _stop(agent)
        publisher.stop()
    finally:
        _stop(broker)
        if os.environ.get("EF_BENCH_KEEP"):
            print(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "agent_rss_mb": round(agent_rss, 1),
        "bare_rss_mb": round(bare_rss, 1),
        "agent_rss_over_bare_mb": round(agent_rss - bare_rss, 1),
        "agent_rss_signed_mb": round(signed_rss, 1),
        "agent_rss_signed_over_bare_mb": round(signed_rss - bare_rss, 1),
        "agent_rss_after_install_mb": round(installed_rss, 1),
        "agent_cold_start_s": round(statistics.median(agent_starts), 3),
        "bare_cold_start_s": round(statistics.median(bare_starts), 3),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
