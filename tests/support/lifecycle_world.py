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
from agent.serving.model_holder import ModelHolder
from agent.trust import DirectoryFetcher, TrustClient
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from simulators.models import make_mlp_onnx, mlp_manifest, mlp_reference, mlp_weights

X = np.random.default_rng(3).standard_normal((8, 32)).astype(np.float32)
#: commit at once on the golden vectors alone (most tests send no traffic in probation)
FAST = {"probation_requests": 0, "probation_seconds": 0.0, "inference_timeout_s": 2.0, "traffic": "none"}


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
                health: dict[str, Any] | None = None, model: bytes | None = None) -> str:
        """Build and publish `mlp-<version>`; returns its bundle id."""
        model = model if model is not None else make_mlp_onnx(model_seed)
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


def make_spinning_mlp(trips: int) -> bytes:
    """A valid x[batch,32] -> logits[batch,4] ONNX model whose every run spins an ONNX `Loop`
    `trips` times inside onnxruntime (about 2-3 us per trip): a real, bounded native hang."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = mlp_weights(0, (32, 4))[0][0]
    scalar = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "spin",
        [scalar("i", TensorProto.INT64, []), scalar("c_in", TensorProto.BOOL, []),
         scalar("v_in", TensorProto.FLOAT, [])],
        [scalar("c_out", TensorProto.BOOL, []), scalar("v_out", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    nodes = [
        helper.make_node("Loop", ["M", "cond", "v0"], ["v"], body=body),
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Mul", ["v", "zero"], ["vz"]),
        helper.make_node("Add", ["mm", "vz"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(trips, np.int64), "M"),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(np.array(0.0, np.float32), "v0"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(w, "W"),
    ]
    graph = helper.make_graph(
        nodes, "spinning_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
