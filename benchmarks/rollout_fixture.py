"""The fleet the rollout benchmarks drive (two registered bundle versions, idle devices) and how
they time its ticks.

`bench_rollout_tick`, `bench_rollout_scale` and `bench_rollout_policies` time the controller
over this same set-up; the publisher is a counter, so what is timed is the controller's own
signing, decisions and database writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fleet.store import Store
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository

DIGEST = "sha256:" + "ab" * 32
VERSIONS = ("1.0.0", "2.0.0")


class CountingPublisher:
    """Stands in for the MQTT publisher: counts the director documents it is handed."""

    def __init__(self) -> None:
        self.count = 0

    def publish_desired(self, device_id: str | None = None, cohort: str | None = None, *,
                        document: bytes) -> str:
        self.count += 1
        return str(device_id)


def seed_models(store: Store, root: Path) -> Repository:
    """A fresh TUF repository under `root` with model `mlp` 1.0.0 and 2.0.0 registered."""
    repo = Repository(root / "repo", KeyStore(root / "keys"))
    repo.init(root_threshold=1, root_keys=1)
    store.models.create_model("mlp", "", "bench")
    for v in VERSIONS:
        f = root / f"{v}.efb"
        f.write_bytes(v.encode() * 100)
        path = f"models/mlp/mlp-{v}.efb"
        repo.add_target(f, path, {"name": "mlp", "version": v})
        store.models.register_version("mlp", v, DIGEST, "onnx", {}, "bench", bundle_target=path)
    return repo


def seed_idle_devices(store: Store, devices: list[str],
                      labels: Callable[[int], dict[str, str]] = lambda i: {"env": "bench"}) -> None:
    """Enrol `devices`, each idle on mlp 1.0.0 (one transaction)."""
    now = time.time()
    with store.tx():
        for i, d in enumerate(devices):
            store.devices.create(d, labels(i), {}, d, "$7$x", "bench")
            store.devices.record_reported_state(d, {"state": "idle", "active_bundle": "mlp-1.0.0",
                                                    "timestamp": now})


def median_tick_s(tick: Callable[[], object], ticks: int = 5) -> float:
    """The median time of `ticks` more controller ticks (idle ones once the cohort is assigned)."""
    times = []
    for _ in range(ticks):
        t0 = time.perf_counter()
        tick()
        times.append(time.perf_counter() - t0)
    return sorted(times)[ticks // 2]
