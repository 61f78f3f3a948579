"""Delta targets on the fleet: built from real bundles, signed into a real TUF repository, named in
director documents only for agents that report the `delta` feature."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.contract.bundle import write_bundle
from agent.contract.delta import apply_delta, file_sha256
from agent.contract.director import DirectorTrust, TargetRef, verify_director
from fleet.registry import deltas as deltas_mod
from fleet.registry.delta_builds import BuildJob, DeltaBuilds, delta_answer
from fleet.registry.deltas import DeltaCatalog, DeltaPolicy, most_common_bases
from fleet.rollouts.controller import RolloutController
from fleet.rollouts.controller_ports import ControllerConfig
from fleet.rollouts.record_types import bundle_index
from fleet.store import Store
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from simulators.models import make_mlp_onnx, mlp_manifest
from tests.support.fakes import DIGEST, FakeClock


def _head_retrained(model: bytes) -> bytes:
    """The same model with only its last layer's weights changed."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model)
    for init in proto.graph.initializer:
        if init.name == "W2":
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((arr * 1.5 + 0.01).astype(np.float32), "W2"))
    return bytes(proto.SerializeToString())


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"))
    r.init(root_threshold=1, root_keys=1)
    big = (32, 256, 256, 4)  # large enough that the untouched layers dominate the bundle
    base = make_mlp_onnx(0, big)
    models = (("1.0.0", base), ("2.0.0", _head_retrained(base)), ("3.0.0", make_mlp_onnx(5, big)))
    for version, model in models:
        out = tmp_path / f"mlp-{version}.efb"
        write_bundle(mlp_manifest(model, version=version, sizes=big), model, out)
        r.add_target(out, f"models/mlp/mlp-{version}.efb", {"name": "mlp", "version": version})
    return r


def _local(repo: Repository, ref: TargetRef) -> Path:
    dirname, _, name = ref.path.rpartition("/")
    return repo.targets_dir / dirname / f"{ref.sha256}.{name}"


def test_most_common_bases_skip_the_target_and_devices_without_a_bundle() -> None:
    runs = ["a", "b", "b", None, "t", "c", "c", "c"]
    assert most_common_bases(runs, "t", 2) == ["c", "b"]
    assert most_common_bases(runs, "t", 0) == []


def test_catalog_signs_a_small_delta_that_rebuilds_the_bundle(repo: Repository, tmp_path: Path) -> None:
    index = bundle_index(repo)
    full, base = index["mlp-2.0.0"], index["mlp-1.0.0"]
    found = DeltaCatalog(repo).for_devices(full, index, ["mlp-1.0.0", "mlp-1.0.0", "mlp-2.0.0", None])
    delta = found["mlp-1.0.0"]
    assert delta.base_sha256 == base.sha256 and delta.length < 0.6 * full.length
    info = repo.load("targets").signed.targets[delta.path]  # a TUF target of its own
    assert info.length == delta.length and info.hashes["sha256"] == delta.sha256
    assert info.unrecognized_fields["custom"]["delta_of"] == full.path
    assert set(bundle_index(repo)) == {"mlp-1.0.0", "mlp-2.0.0", "mlp-3.0.0"}  # not mistaken for a bundle
    out = tmp_path / "rebuilt.efb"
    apply_delta(_local(repo, base), _local(repo, delta.as_target()), out,
                expected_sha256=full.sha256, expected_length=full.length)
    assert file_sha256(out) == full.sha256


def test_delta_over_the_ratio_is_not_published_nor_rebuilt(repo: Repository,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    index = bundle_index(repo)
    calls: list[str] = []
    real = deltas_mod.build_delta

    def counting(old: Path, new: Path, level: int = 19) -> Any:
        calls.append(old.name)
        return real(old, new, level)

    monkeypatch.setattr(deltas_mod, "build_delta", counting)
    catalog = DeltaCatalog(repo, DeltaPolicy(max_ratio=0.05))
    full = index["mlp-3.0.0"]  # an unrelated model: no delta is worth it
    assert catalog.for_devices(full, index, ["mlp-1.0.0"]) == {}
    assert catalog.for_devices(full, index, ["mlp-1.0.0"]) == {}
    assert len(calls) == 1  # judged once, not on every tick
    disabled = DeltaCatalog(repo, DeltaPolicy(bases=0))
    assert disabled.for_devices(index["mlp-2.0.0"], index, ["mlp-1.0.0"]) == {}


def _controller(repo: Repository, tmp_path: Path, clock: FakeClock,
                deltas: DeltaCatalog | DeltaBuilds) -> tuple[Store, RolloutController, dict[str, bytes]]:
    """A store with mlp 1.0.0 and 2.0.0, and a controller whose publisher keeps each device's document."""
    store = Store(tmp_path / "fleet.db", clock=clock)
    store.models.create_model("mlp", "", "test")
    for v in ("1.0.0", "2.0.0"):
        store.models.register_version("mlp", v, DIGEST, "onnx", {}, "test",
                                      bundle_target=f"models/mlp/mlp-{v}.efb")
    docs: dict[str, bytes] = {}

    class Pub:
        def publish_desired(self, device_id: str | None = None, cohort: str | None = None, *,
                            document: bytes) -> str:
            assert device_id is not None
            docs[device_id] = document
            return device_id

    signer = DirectorSigner(KeyStore(tmp_path / "keys"), tmp_path / "director")
    return store, RolloutController(store, repo, signer, Pub(), clock, ControllerConfig(tick_s=0.05),
                                    deltas=deltas), docs


def test_controller_names_the_delta_only_for_agents_that_report_the_feature(
        repo: Repository, tmp_path: Path) -> None:
    clock = FakeClock()
    store, ctl, docs = _controller(repo, tmp_path, clock, DeltaCatalog(repo))
    try:
        for dev, features in (("new-agent", ["delta"]), ("old-agent", [])):
            store.devices.create(dev, {"env": "prod"}, {}, dev, "$7$x", "test")
            store.devices.record_reported_state(dev, {"state": "idle", "active_bundle": "mlp-1.0.0",
                                                      "timestamp": clock.now, "features": features})
        store.rollouts.create("mlp:2.0.0", "env=prod", {"kind": "all_at_once"}, {}, "op")
        ctl.tick()
        ctl.tick()
        assert set(docs) == {"new-agent", "old-agent"}
        assert "delta" not in json.loads(docs["old-agent"])["signed"]  # an old agent refuses unknown fields
        trust = DirectorTrust.from_root(repo.load("root").signed)
        doc = verify_director(docs["new-agent"], trust, "new-agent", [], 0, datetime.now(UTC))
        assert doc.delta is not None and doc.delta.base_bundle == "mlp-1.0.0"
        assert doc.target.path == "models/mlp/mlp-2.0.0.efb"
    finally:
        store.close()


def test_delta_answer_waits_for_a_running_build_only_within_its_time() -> None:
    from concurrent.futures import Future

    ref = TargetRef(path="models/mlp/mlp-1.0.0.efb", length=1, sha256="0" * 64, name="mlp", version="1.0.0")
    running: Future[dict[str, Any]] = Future()
    done: Future[dict[str, Any]] = Future()
    done.set_result({})
    assert delta_answer([], None, 0.0, 10.0) == "published"
    assert delta_answer([], BuildJob(running, ("mlp-1.0.0",), 0.0), 1.0, 10.0) == "wait"  # mid-build
    assert delta_answer([ref], None, 0.0, 10.0) == "build"
    assert delta_answer([ref], BuildJob(running, ("mlp-1.0.0",), 0.0), 9.9, 10.0) == "wait"
    assert delta_answer([ref], BuildJob(running, ("mlp-1.0.0",), 0.0), 10.0, 10.0) == "published"
    # a finished job for these bases is not retried (what it could not build stays missing) ...
    assert delta_answer([ref], BuildJob(done, ("mlp-1.0.0",), 0.0), 1.0, 10.0) == "published"
    # ... but a base that appears later (devices of a later stage) gets a build of its own
    assert delta_answer([ref], BuildJob(done, ("mlp-0.9.0",), 0.0), 1.0, 10.0) == "build"


def test_controller_assigns_after_the_deltas_are_built_off_its_tick(
        repo: Repository, tmp_path: Path) -> None:
    clock = FakeClock()
    builds = DeltaBuilds(DeltaCatalog(repo))
    builds.start()
    store, ctl, docs = _controller(repo, tmp_path, clock, builds)
    try:
        store.devices.create("gw", {"env": "prod"}, {}, "gw", "$7$x", "test")
        store.devices.record_reported_state("gw", {"state": "idle", "active_bundle": "mlp-1.0.0",
                                                   "timestamp": clock.now, "features": ["delta"]})
        store.rollouts.create("mlp:2.0.0", "env=prod", {"kind": "all_at_once"}, {}, "op")
        ctl.tick()
        assert docs == {}  # the delta is being built: nothing assigned, the tick did not wait for it
        deadline = time.monotonic() + 60
        while not docs and time.monotonic() < deadline:
            time.sleep(0.05)
            ctl.tick()
        assert set(docs) == {"gw"}
        trust = DirectorTrust.from_root(repo.load("root").signed)
        doc = verify_director(docs["gw"], trust, "gw", [], 0, datetime.now(UTC))
        assert doc.delta is not None and doc.delta.base_bundle == "mlp-1.0.0"
        # built once: a later call answers at once from the signed targets
        index = bundle_index(repo)
        assert builds.for_devices(index["mlp-2.0.0"], index, ["mlp-1.0.0"]) == {"mlp-1.0.0": doc.delta}
    finally:
        builds.stop()
        store.close()


def test_stopped_builds_fall_back_to_building_inline(repo: Repository) -> None:
    index = bundle_index(repo)
    found = DeltaBuilds(DeltaCatalog(repo)).for_devices(index["mlp-2.0.0"], index, ["mlp-1.0.0"])
    assert found is not None and set(found) == {"mlp-1.0.0"}
