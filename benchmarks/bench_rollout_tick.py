"""Rollout controller cost per tick for a 500-device cohort (real SQLite, TUF repo, signer).

Measured beside baselines from the same run: signing the same number of director documents
with `DirectorSigner.issue` alone (the floor of an assigning tick), and one query of every
device's reported state (the floor of an idle tick). Publishing is an in-memory recorder
here: MQTT publish cost is measured by the transfer benchmark.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.rollout_fixture import CountingPublisher, median_tick_s, seed_idle_devices, seed_models
from fleet.rollouts.controller import RolloutController
from fleet.rollouts.records import RolloutRecords
from fleet.store import Store
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore

NAME = "rollout_tick"
DESCRIPTION = "rollout controller: assign / idle / commit ticks over 500 devices vs signing and query floors"
N = 500


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = Store(root / "fleet.db")
        repo = seed_models(store, root)
        devices = [f"dev-{i:04d}" for i in range(N)]
        seed_idle_devices(store, devices)
        signer = DirectorSigner(KeyStore(root / "keys"), root / "director")
        pub = CountingPublisher()
        ctl = RolloutController(store, repo, signer, pub)

        ref = repo.target_ref("models/mlp/mlp-2.0.0.efb")
        t0 = time.perf_counter()
        for d in devices:
            signer.issue(ref, device_id=f"base-{d}")
        sign_s = time.perf_counter() - t0

        plan = {"kind": "all_at_once", "bake_s": 0}
        rid = store.rollouts.create("mlp:2.0.0", "env=bench", plan, {}, "bench").id
        t0 = time.perf_counter()
        ctl.tick()  # starts the rollout and assigns all devices
        assign_s = time.perf_counter() - t0
        assert pub.count == N

        records = RolloutRecords(store)
        t0 = time.perf_counter()
        records.reported_states(devices)
        query_s = time.perf_counter() - t0
        idle = median_tick_s(ctl.tick)

        for d in devices:
            store.devices.record_reported_state(d, {"state": "idle", "active_bundle": "mlp-2.0.0",
                                                    "timestamp": time.time()})
        t0 = time.perf_counter()
        ctl.tick()
        commit_s = time.perf_counter() - t0
        ctl.tick()
        assert store.rollouts.get(rid).state == "completed", store.rollouts.status(rid)
        store.close()
    return {
        "rollout_assign_tick_s": assign_s,
        "baseline_sign_only_s": sign_s,
        "rollout_assign_per_device_ms": assign_s / N * 1e3,
        "rollout_idle_tick_ms": idle * 1e3,
        "baseline_reported_query_ms": query_s * 1e3,
        "rollout_commit_tick_s": commit_s,
    }
