"""Hot swap and rollback under continuous requests, through the real lifecycle.

Threads hammer a `ModelHolder` while the lifecycle installs a good bundle (activation and
commit) and then a bundle whose probation fails (tiny latency budget -> rollback), several
rounds. Reports failed requests during those swaps (goal 0), the time from the failed
health check to the previous model serving again (`rollback_ms`, goal <= 100; it includes
saving the state record with fsync), the bare reference swap, and as baselines the time
to load a session from disk (what a rollback without a warm standby would pay) and a
bare `predict`.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.bundle import write_bundle
from agent.contract.manifest import Manifest
from agent.lifecycle import DesiredTarget, Lifecycle, LifecycleConfig
from agent.runtimes import load_model
from agent.serving.model_holder import ModelHolder
from agent.trust import DirectoryFetcher, TrustClient
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from simulators.models import make_mlp_onnx, mlp_manifest, mlp_reference, mlp_weights

NAME = "swap"
DESCRIPTION = "failed requests during activation/rollback under load; failed-health-to-previous-serving time"
ROUNDS = 6
THREADS = 3
X = np.random.default_rng(3).standard_normal((8, 32)).astype(np.float32)


def _publish(repo: Repository, root: Path, version: str, seed: int, health: dict[str, Any]) -> DesiredTarget:
    model = make_mlp_onnx(seed)
    base = mlp_manifest(model, version=version)
    manifest = Manifest.model_validate({
        **base.model_dump(),
        "golden": {
            "inputs": {"x": X.tolist()},
            "expected": {"logits": mlp_reference(X, mlp_weights(seed)).tolist()},
        },
        "health": health,
    })
    out = root / f"mlp-{version}.efb"
    write_bundle(manifest, model, out)
    ref = repo.add_target(out, f"models/mlp/mlp-{version}.efb", {"name": "mlp", "version": version})
    return DesiredTarget(0, ref.path, ref.length, ref.sha256, ref.name, ref.version)


def _hammer(holder: ModelHolder, stop: threading.Event, counts: dict[str, int], lock: threading.Lock) -> None:
    x = {"x": X[:1]}
    while not stop.is_set():
        try:
            holder.predict(x)
            key = "ok"
        except Exception:
            key = "failed"
        with lock:
            counts[key] += 1


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = Repository(root / "repo", KeyStore(root / "keys"))
        repo.init(root_threshold=1, root_keys=1)
        fast = {"probation_requests": 50, "probation_seconds": 0.0, "latency_budget_ms": 1000.0}
        targets = {
            "v1": _publish(repo, root, "1.0.0", 0, fast),
            "v2": _publish(repo, root, "2.0.0", 1, fast),
        }
        for i in range(ROUNDS):
            targets[f"bad{i}"] = _publish(repo, root, f"3.0.{i}", 2, {**fast, "latency_budget_ms": 1e-6})
        fetcher = DirectoryFetcher(repo.repo_dir)
        trust = TrustClient(
            root / "dev/tuf/meta",
            root / "dev/tuf/targets",
            fetcher,
            fetcher.url_for("metadata"),
            fetcher.url_for("targets"),
            bootstrap_root=(repo.metadata_dir / "1.root.json").read_bytes(),
        )
        events: list[tuple[str, dict[str, Any]]] = []
        holder = ModelHolder()
        lc = Lifecycle(LifecycleConfig(state_dir=root / "dev/state", probation_poll_s=0.001), holder, trust,
                       lambda n, f: events.append((n, f)))
        seq = 0

        def offer(key: str) -> None:
            nonlocal seq
            seq += 1
            lc.offer_desired(DesiredTarget(**{**targets[key].__dict__, "sequence": seq}))

        stop, lock = threading.Event(), threading.Lock()
        counts = {"ok": 0, "failed": 0}
        round_s: list[tuple[float, float]] = []
        args = (holder, stop, counts, lock)
        workers = [threading.Thread(target=_hammer, args=args) for _ in range(THREADS)]
        for w in workers:
            w.start()
        try:
            offer("v1")  # first install: requests fail until a model serves, so not counted
            lc.start()
            with lock:
                counts["failed"] = counts["ok"] = 0
            for i in range(ROUNDS):
                t0 = time.perf_counter()
                offer("v2" if i % 2 == 0 else "v1")  # activation + probation + commit
                lc.run_until_stable()
                t1 = time.perf_counter()
                offer(f"bad{i}")  # activation, probation fails, rollback
                lc.run_until_stable()
                round_s.append((t1 - t0, time.perf_counter() - t1))
        finally:
            stop.set()
            for w in workers:
                w.join()
        rollbacks = [f["measurements"]["rollback_ms"] for n, f in events if n == "rolled_back"]
        completes = [f["measurements"]["rollback_complete_ms"] for n, f in events if n == "rolled_back"]
        commits = sum(1 for n, _ in events if n == "committed")
        if len(rollbacks) != ROUNDS or commits != ROUNDS + 1:
            raise RuntimeError(f"unexpected lifecycle outcome: {[n for n, _ in events]}")

        # baselines in the same run: load a session from disk; bare predict; bare reference swap
        slot = lc.ctx.slots.open(lc.record.active or "")
        loads, predicts, reverts = [], [], []
        for _ in range(20):
            t0 = time.perf_counter()
            m = load_model(slot.model_path, slot.manifest)
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m.predict({"x": X[:1]})
            predicts.append(time.perf_counter() - t0)
            holder.swap(m, "bench", keep_previous=True)
            t0 = time.perf_counter()
            holder.revert()
            reverts.append(time.perf_counter() - t0)
        holder.close()
    return {
        "swap.failed_requests_during_swap": float(counts["failed"]),
        "swap.requests_served_during_swaps": float(counts["ok"]),
        "swap.activations": float(ROUNDS * 2),
        "swap.rollback_ms_median": statistics.median(rollbacks),
        "swap.rollback_ms_max": max(rollbacks),
        "swap.rollback_complete_ms_median": statistics.median(completes),
        "swap.rollback_complete_ms_max": max(completes),
        "swap.revert_ref_swap_ms_median": statistics.median(reverts) * 1000,
        "swap.baseline_session_load_ms_median": statistics.median(loads) * 1000,
        "swap.baseline_predict_ms_median": statistics.median(predicts) * 1000,
        "swap.update_round_s_median": statistics.median(a for a, _ in round_s),
        "swap.failed_update_round_s_median": statistics.median(b for _, b in round_s),
    }
