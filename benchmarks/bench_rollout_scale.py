"""Rollout at fleet scale: one 10,000-device all-at-once stage signed, published and recorded.

`rollout_devices_per_min` is the controller's assigning tick (start, cohort, batch signing with
one sequence transaction per 500 devices, publish to an in-memory recorder, progress rows) over
`N` devices. Baselines from the same run: `baseline_serial_issue_per_min`, the old way of
signing (one `DirectorSigner.issue` per device, each its own durable sequence commit) on 2,000
devices, and `baseline_batch_issue_per_min`, `issue_many` alone (the signing floor of a tick).
MQTT publishing is measured by the transfer and fleet_scale benchmarks. `--database` picks the
database (`benchmarks/db_url.py`): on PostgreSQL the fleet store and the director sequences
share the one (scratch) database, as `fleet serve --database` has them; the metrics get `_pg`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.db_url import parse_database
from benchmarks.rollout_fixture import CountingPublisher, seed_idle_devices, seed_models
from fleet.rollouts.controller import RolloutController
from fleet.store import Store
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore

NAME = "rollout_scale"
DESCRIPTION = "rollout controller: one 10,000-device all_at_once stage vs serial and batch signing floors"
N = int(os.environ.get("EDGEFLEET_BENCH_ROLLOUT_DEVICES", "10000"))
SERIAL_N = 2000


def run(database: str | None = None) -> dict[str, float]:
    db = parse_database(database)
    with tempfile.TemporaryDirectory() as tmp, db.scratch(Path(tmp)) as location:
        root = Path(tmp)
        store = Store(location)
        director_db = location if db.backend == "pg" else None  # SQLite: its own file, as in production
        repo = seed_models(store, root)
        devices = [f"dev-{i:05d}" for i in range(N)]
        seed_idle_devices(store, devices)
        signer = DirectorSigner(KeyStore(root / "keys"), root / "director", database=director_db)
        ref = repo.target_ref("models/mlp/mlp-2.0.0.efb")
        t0 = time.perf_counter()
        for d in devices[:SERIAL_N]:
            signer.issue(ref, device_id=f"serial-{d}")
        serial_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, N, 500):
            signer.issue_many(ref, [f"batch-{d}" for d in devices[i:i + 500]])
        batch_s = time.perf_counter() - t0

        pub = CountingPublisher()
        ctl = RolloutController(store, repo, signer, pub)
        rid = store.rollouts.create("mlp:2.0.0", "env=bench", {"kind": "all_at_once", "bake_s": 0}, {},
                                    "bench").id
        t0 = time.perf_counter()
        ctl.tick()  # starts the rollout and assigns every device
        assign_s = time.perf_counter() - t0
        assert pub.count == N, pub.count
        with store.read() as conn:
            assigned = conn.scalar("SELECT COUNT(*) FROM rollout_progress WHERE rollout_id = :id AND "
                                   "assigned_at IS NOT NULL", {"id": rid})
        assert assigned == N, assigned
        store.close()
        signer.close()
    tag = "" if db.backend == "sqlite" and database is None else f"_{db.backend}"
    return {
        f"rollout_devices_per_min{tag}": N / assign_s * 60,
        f"rollout_assign_tick_s{tag}": assign_s,
        "rollout_scale_devices": float(N),
        "baseline_serial_issue_per_min": SERIAL_N / serial_s * 60,
        "baseline_batch_issue_per_min": N / batch_s * 60,
    }
