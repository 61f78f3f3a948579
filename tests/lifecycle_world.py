"""Shared setup for the lifecycle tests: a real TUF repository with real bundles.

Bundles are written with `agent.contract.bundle.write_bundle`, published with the fleet's
`Repository`, fetched by the agent's `TrustClient` through `DirectoryFetcher`, and loaded
by onnxruntime. Golden vectors come from the numpy reference of a chosen seed, so a model
built from another seed fails them (the cheapest real "bad model").
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.bundle import write_bundle
from agent.contract.manifest import GoldenVectors, HealthPolicy, Manifest
from agent.lifecycle import DesiredTarget, Lifecycle, LifecycleConfig
from agent.serving import ModelHolder
from agent.trust import DirectoryFetcher, TrustClient
from fleet.keys import KeyStore
from fleet.repository import Repository
from simulators.models import make_mlp_onnx, mlp_manifest, mlp_reference, mlp_weights

X = np.random.default_rng(3).standard_normal((8, 32)).astype(np.float32)
FAST = {"probation_requests": 0, "probation_seconds": 0.0, "inference_timeout_s": 2.0}


def manifest_for(
    version: str, model: bytes, golden_seed: int, health: dict[str, Any] | None = None
) -> Manifest:
    m = mlp_manifest(model, version=version)
    golden = GoldenVectors(
        inputs={"x": X.tolist()},
        expected={"logits": mlp_reference(X, mlp_weights(golden_seed)).tolist()},
    )
    return Manifest.model_validate(
        {
            **m.model_dump(),
            "golden": golden.model_dump(),
            "health": HealthPolicy(**(health or FAST)).model_dump(),
        }
    )


@dataclass
class Repo:
    root: Path
    repo: Repository
    sequence: int = 0
    refs: dict[str, DesiredTarget] = field(default_factory=dict)

    def publish(self, version: str, model_seed: int, golden_seed: int | None = None,
                health: dict[str, Any] | None = None) -> str:
        """Build and publish `mlp-<version>`; returns its bundle id."""
        model = make_mlp_onnx(model_seed)
        manifest = manifest_for(version, model, model_seed if golden_seed is None else golden_seed, health)
        out = self.root / "built" / f"mlp-{version}.efb"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bundle(manifest, model, out)
        ref = self.repo.add_target(out, f"models/mlp/mlp-{version}.efb", {"name": "mlp", "version": version})
        self.refs[manifest.bundle_id] = DesiredTarget(
            0, ref.path, ref.length, ref.sha256, ref.name, ref.version
        )
        return manifest.bundle_id

    def desired(self, bundle_id: str, shadow: str | None = None) -> DesiredTarget:
        """A new director document (next sequence) naming `bundle_id`."""
        self.sequence += 1
        base = self.refs[bundle_id]
        sh = self.refs[shadow] if shadow else None
        if sh is not None:
            sh = DesiredTarget(**{**sh.__dict__, "sequence": self.sequence})
        return DesiredTarget(**{**base.__dict__, "sequence": self.sequence, "shadow": sh})

    def trust(self, device_dir: Path) -> TrustClient:
        fetcher = DirectoryFetcher(self.repo.repo_dir)
        return TrustClient(
            device_dir / "tuf/metadata",
            device_dir / "tuf/targets",
            fetcher,
            fetcher.url_for("metadata"),
            fetcher.url_for("targets"),
            bootstrap_root=(self.repo.metadata_dir / "1.root.json").read_bytes(),
        )


def make_repo(root: Path) -> Repo:
    repo = Repository(root / "repo", KeyStore(root / "keys"))
    repo.init(root_threshold=1, root_keys=1)
    return Repo(root, repo)


@dataclass
class Device:
    dir: Path
    holder: ModelHolder
    lifecycle: Lifecycle
    events: list[tuple[str, dict[str, Any]]]

    def names(self) -> list[str]:
        return [n for n, _ in self.events]

    def event(self, name: str) -> dict[str, Any]:
        found = [f for n, f in self.events if n == name]
        assert found, f"no {name!r} event in {self.names()}"
        return found[-1]


def make_device(repo: Repo, device_dir: Path, holder: ModelHolder | None = None, **config: Any) -> Device:
    events: list[tuple[str, dict[str, Any]]] = []
    holder = holder or ModelHolder(drain_timeout_s=2.0)
    load = config.pop("load", None)
    cfg = LifecycleConfig(state_dir=device_dir / "state", load_timeout_s=config.pop("load_timeout_s", 5.0),
                          probation_poll_s=0.002, **config)
    kwargs: dict[str, Any] = {"load": load} if load else {}
    lc = Lifecycle(cfg, holder, repo.trust(device_dir), lambda n, f: events.append((n, f)), **kwargs)
    return Device(device_dir, holder, lc, events)


class Hammer:
    """Threads sending requests to a holder continuously; counts successes and failures."""

    def __init__(self, holder: ModelHolder, threads: int = 3) -> None:
        self.holder = holder
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        x = {"x": X[:1]}
        while not self._stop.is_set():
            try:
                self.holder.predict(x)
                with self._lock:
                    self.ok += 1
            except Exception as exc:
                with self._lock:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0)

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
