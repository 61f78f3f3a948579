"""Sealed (encrypted) bundles on real files: real TUF repository, real crypto, real onnxruntime.

A device of the cohort installs and serves the model; a device outside it, and every tampered
ciphertext or wrapped key, is refused with a specific error and leaves the slots as they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.contract.director import TargetRef
from agent.contract.envelope import WrappedKeys, public_key_raw, recipients_target, wrap_content_key
from agent.contract.sealed import MAGIC, TAG_BYTES, read_header
from agent.errors import BundleEncryptionError, BundleNotForThisDeviceError, MisuseError
from agent.lifecycle import DesiredTarget, Lifecycle, LifecycleConfig, SealingExtractor, Slots, State
from agent.lifecycle.decrypt import sealing_extractor
from agent.lifecycle.delta_fetch import fetch_by_delta
from agent.lifecycle.state_store import DesiredDelta
from agent.serving.model_holder import ModelHolder
from agent.trust.wrap_key import create_wrap_key, load_wrap_key, wrap_key_path
from fleet.registry.sealing import seal_bundle
from simulators.models import make_mlp_onnx, mlp_reference, mlp_weights
from tests.support.lifecycle_world import Repo, X, make_repo, manifest_for

CHUNK = 16 << 10  # small chunks: the ~10 KB test model spans several


@dataclass
class Sealed:
    bundle_id: str
    plain: Path
    sealed: Path
    key: bytes
    ref: DesiredTarget
    model: bytes


def _publish_sealed(r: Repo, version: str, seed: int, recipients: dict[str, X25519PrivateKey]) -> Sealed:
    model = make_mlp_onnx(seed)
    manifest = manifest_for(version, model, seed)
    from agent.contract.bundle import write_bundle

    plain = r.root / "built" / f"mlp-{version}.efb"
    plain.parent.mkdir(parents=True, exist_ok=True)
    write_bundle(manifest, model, plain)
    sealed = r.root / "built" / f"mlp-{version}.sealed"
    _, key = seal_bundle(plain, sealed, CHUNK)
    ref = r.repo.add_target(sealed, f"models/mlp/mlp-{version}.efb", {"name": "mlp", "version": version})
    _publish_recipients(r, manifest.bundle_id, ref.sha256, key, recipients)
    desired = DesiredTarget(0, ref.path, ref.length, ref.sha256, ref.name, ref.version)
    r.refs[manifest.bundle_id] = desired
    return Sealed(manifest.bundle_id, plain, sealed, key, desired, model)


def _publish_recipients(r: Repo, bundle_id: str, sha: str, key: bytes,
                        recipients: dict[str, X25519PrivateKey]) -> WrappedKeys:
    doc = WrappedKeys(bundle_id=bundle_id, bundle_sha256=sha, recipients=[
        wrap_content_key(key, k.public_key(), dev, sha) for dev, k in sorted(recipients.items())])
    path = r.root / "built" / f"{sha}.json"
    path.write_bytes(doc.to_json())
    r.repo.add_target(path, recipients_target(sha))
    return doc


@dataclass
class World:
    repo: Repo
    keys: dict[str, Path]  # device -> its state dir (holding the wrap key)
    v2: Sealed
    v3: Sealed


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("sealed")
    r = make_repo(root)
    r.publish("1.0.0", model_seed=0)  # plain: what every device serves first
    states = {dev: root / dev / "state" for dev in ("dev-a", "dev-b", "dev-c")}
    for state in states.values():
        state.mkdir(parents=True)
        create_wrap_key(state)
    cohort = {dev: load_wrap_key(states[dev]) for dev in ("dev-a", "dev-b")}  # dev-c is outside
    v2 = _publish_sealed(r, "2.0.0", 1, cohort)
    v3 = _publish_sealed(r, "3.0.0", 2, cohort)
    return World(r, states, v2, v3)


def _device(w: World, dev: str) -> tuple[Lifecycle, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    state = w.keys[dev]
    trust = w.repo.trust(state.parent)
    cfg = LifecycleConfig(state_dir=state / "lifecycle", load_timeout_s=5.0, probation_poll_s=0.002)
    lc = Lifecycle(cfg, ModelHolder(drain_timeout_s=2.0), trust, lambda n, f: events.append((n, f)),
                   extract=sealing_extractor(trust, dev, state))
    lc.offer_desired(w.repo.desired("mlp-1.0.0"))
    assert lc.start() is State.IDLE and lc.record.active == "mlp-1.0.0"
    return lc, events


def _snapshot(slots_root: Path) -> dict[str, str]:
    return {str(p.relative_to(slots_root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(slots_root.rglob("*")) if p.is_file()}


@pytest.mark.integration
def test_a_device_of_the_cohort_installs_and_serves_the_sealed_model(world: World) -> None:
    lc, events = _device(world, "dev-a")
    lc.offer_desired(world.repo.desired(world.v2.bundle_id))
    assert lc.run_until_stable() is State.IDLE
    assert lc.record.active == "mlp-2.0.0", lc.record.last_error
    out = lc.ctx.holder.predict({"x": X})["logits"]
    np.testing.assert_allclose(out, mlp_reference(X, mlp_weights(1)), rtol=1e-4, atol=1e-5)
    assert "committed" in [n for n, _ in events]
    # the plaintext model is only in its slot: the TUF cache and the downloads hold ciphertext
    needle = world.v2.model[4096:4160]
    state = world.keys["dev-a"]
    holders = [p for p in state.parent.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert holders and all(p.is_relative_to(state / "lifecycle" / "bundles" / "mlp-2.0.0") for p in holders)


@pytest.mark.integration
def test_a_device_outside_the_cohort_is_refused_and_nothing_changes(world: World) -> None:
    lc, events = _device(world, "dev-c")
    slots = lc.ctx.slots.root
    before = _snapshot(slots)
    lc.offer_desired(world.repo.desired(world.v2.bundle_id))
    assert lc.run_until_stable() is State.IDLE
    assert lc.record.active == "mlp-1.0.0"
    assert _snapshot(slots) == before
    refused = [f for n, f in events if n == "rolled_back"]  # refused untrusted data: quarantined
    assert refused and refused[-1]["bundle"] == "mlp-2.0.0" and refused[-1]["swapped"] is False
    assert "outside its cohort" in refused[-1]["reason"]
    assert "mlp-2.0.0" in lc.record.quarantined
    assert lc.ctx.holder.bundle_id == "mlp-1.0.0"


# --- the extractor alone: each attack is refused with the slots unchanged ----------------------
class _Targets:
    """A TUF stand-in serving one recipients document (the attacks below bypass TUF on purpose:
    the AEAD and the key binding must refuse them on their own)."""

    def __init__(self, docs: dict[str, bytes], tmp: Path) -> None:
        self.docs, self.tmp = docs, tmp

    def download_target(self, target_path: str, expected: TargetRef | None = None) -> Path:
        path = self.tmp / hashlib.sha256(target_path.encode()).hexdigest()
        path.write_bytes(self.docs[target_path])
        return path


def _attempt(tmp_path: Path, world: World, sealed: bytes, doc: WrappedKeys | bytes, dev: str = "dev-a",
             expected: str | None = None,
             error: type[BundleEncryptionError] = BundleEncryptionError) -> Slots:
    bundle = tmp_path / "bundle.sealed"
    bundle.write_bytes(sealed)
    sha = expected or hashlib.sha256(sealed).hexdigest()
    data = doc if isinstance(doc, bytes) else doc.to_json()
    extractor = SealingExtractor(_Targets({recipients_target(sha): data}, tmp_path), dev,
                                 lambda: load_wrap_key(world.keys[dev]))
    slots = Slots(tmp_path / "state")
    with pytest.raises(error) as info:
        slots.install("mlp-2.0.0", bundle, lambda src, dest: extractor(
            src, dest, expected_sha256=sha, expected_length=len(sealed)))
    assert slots.installed() == [] and list(slots.root.iterdir()) == []  # nothing left behind
    if error is BundleEncryptionError:  # the generic refusals are not "another cohort"
        assert not isinstance(info.value, BundleNotForThisDeviceError), info.value
    return slots


def _doc_for(world: World, data: bytes, bundle: Sealed, dev: str = "dev-a") -> WrappedKeys:
    sha = hashlib.sha256(data).hexdigest()
    return WrappedKeys(bundle_id=bundle.bundle_id, bundle_sha256=sha, recipients=[
        wrap_content_key(bundle.key, load_wrap_key(world.keys[dev]).public_key(), dev, sha)])


def _chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    import io

    header, header_bytes = read_header(io.BytesIO(data))
    body = data[len(header_bytes):]
    step = header.chunk_bytes + TAG_BYTES
    return header_bytes, [body[i:i + step] for i in range(0, len(body), step)]


@pytest.mark.integration
def test_the_right_recipient_extracts(tmp_path: Path, world: World) -> None:
    data = world.v2.sealed.read_bytes()
    bundle = tmp_path / "b.sealed"
    bundle.write_bytes(data)
    docs = {recipients_target(world.v2.ref.sha256): _doc_for(world, data, world.v2).to_json()}
    ex = SealingExtractor(_Targets(docs, tmp_path), "dev-a", lambda: load_wrap_key(world.keys["dev-a"]))
    slot = Slots(tmp_path / "state").install("mlp-2.0.0", bundle, lambda s, d: ex(
        s, d, expected_sha256=world.v2.ref.sha256, expected_length=len(data)))
    assert slot.model_path.read_bytes() == world.v2.model
    # a delta from this slot would rebuild its plaintext into downloads/: never offered a chance

    class _NoDelta:
        def download_delta(self, delta: TargetRef, full: TargetRef) -> Path:
            raise AssertionError("a sealed slot must not be rebuilt for a delta")

    slots = Slots(tmp_path / "state")
    delta = DesiredDelta("deltas/x.efd", 10, "0" * 64, "mlp-2.0.0", world.v2.ref.sha256, "bsdiff")
    d = DesiredTarget(**{**world.v3.ref.__dict__, "delta": delta})
    assert fetch_by_delta(_NoDelta(), slots, "mlp-2.0.0", d, TargetRef(
        path=d.path, length=d.length, sha256=d.sha256)) is None
    assert list(slots.downloads.iterdir()) == []


@pytest.mark.integration
def test_a_tampered_chunk_is_refused(tmp_path: Path, world: World) -> None:
    data = bytearray(world.v2.sealed.read_bytes())
    data[-TAG_BYTES - 100] ^= 1  # inside the last chunk: earlier chunks decrypt, the slot must not appear
    _attempt(tmp_path, world, bytes(data), _doc_for(world, bytes(data), world.v2))
    # and against the TUF-signed hash of the original (what a device really checks)
    _attempt(tmp_path, world, bytes(data), _doc_for(world, bytes(data), world.v2),
             expected=world.v2.ref.sha256)


@pytest.mark.integration
def test_truncated_and_reordered_ciphertext_is_refused(tmp_path: Path, world: World) -> None:
    data = world.v2.sealed.read_bytes()
    head, chunks = _chunks(data)
    assert len(chunks) >= 3
    truncated = head + b"".join(chunks[:-1])
    _attempt(tmp_path, world, truncated, _doc_for(world, truncated, world.v2))
    reordered = head + chunks[1] + chunks[0] + b"".join(chunks[2:])
    _attempt(tmp_path, world, reordered, _doc_for(world, reordered, world.v2))
    # a truncation the header agrees with (the plaintext length edited): the header is authenticated
    hdr = json.loads(head[len(MAGIC) + 4:])
    hdr["plaintext_bytes"] -= len(chunks[-1]) - TAG_BYTES
    new_header = json.dumps(hdr, sort_keys=True, separators=(",", ":")).encode()
    forged = MAGIC + len(new_header).to_bytes(4, "big") + new_header + b"".join(chunks[:-1])
    _attempt(tmp_path, world, forged, _doc_for(world, forged, world.v2))


@pytest.mark.integration
def test_a_chunk_of_another_bundle_is_refused(tmp_path: Path, world: World) -> None:
    head, chunks = _chunks(world.v2.sealed.read_bytes())
    _, other = _chunks(world.v3.sealed.read_bytes())
    mixed = head + other[0] + b"".join(chunks[1:])
    _attempt(tmp_path, world, mixed, _doc_for(world, mixed, world.v2))


@pytest.mark.integration
def test_a_key_wrapped_for_another_device_is_refused(tmp_path: Path, world: World) -> None:
    data = world.v2.sealed.read_bytes()
    sha = world.v2.ref.sha256
    for_b = wrap_content_key(world.v2.key, load_wrap_key(world.keys["dev-b"]).public_key(), "dev-b", sha)
    # only dev-b's entry: dev-a is outside
    _attempt(tmp_path, world, data, WrappedKeys(bundle_id=world.v2.bundle_id, bundle_sha256=sha,
                                                recipients=[for_b]), error=BundleNotForThisDeviceError)
    # dev-b's entry relabelled for dev-a: made for another key
    _attempt(tmp_path, world, data, WrappedKeys(bundle_id=world.v2.bundle_id, bundle_sha256=sha, recipients=[
        for_b.model_copy(update={"device_id": "dev-a"})]), error=BundleNotForThisDeviceError)
    # dev-b's entry relabelled for dev-a (and claiming dev-a's key id): it does not open
    own_id = hashlib.sha256(public_key_raw(load_wrap_key(world.keys["dev-a"]).public_key())).hexdigest()[:32]
    forged = for_b.model_copy(update={"device_id": "dev-a", "key_id": own_id})
    _attempt(tmp_path, world, data, WrappedKeys(bundle_id=world.v2.bundle_id, bundle_sha256=sha,
                                                recipients=[forged]))


@pytest.mark.integration
def test_a_wrapped_key_swapped_between_bundles_is_refused(tmp_path: Path, world: World) -> None:
    data = world.v2.sealed.read_bytes()
    sha2, sha3 = world.v2.ref.sha256, world.v3.ref.sha256
    pub = load_wrap_key(world.keys["dev-a"]).public_key()
    of_v3 = wrap_content_key(world.v3.key, pub, "dev-a", sha3)
    _attempt(tmp_path, world, data, WrappedKeys(bundle_id=world.v2.bundle_id, bundle_sha256=sha2,
                                                recipients=[of_v3]))
    # the right key, but wrapped with the other bundle's binding
    bound_to_v3 = wrap_content_key(world.v2.key, pub, "dev-a", sha3)
    _attempt(tmp_path, world, data, WrappedKeys(bundle_id=world.v2.bundle_id, bundle_sha256=sha2,
                                                recipients=[bound_to_v3]))
    # a whole recipients document of another bundle
    _attempt(tmp_path, world, data, WrappedKeys(bundle_id=world.v3.bundle_id, bundle_sha256=sha3,
                                                recipients=[of_v3]).to_json(), expected=sha2)


@pytest.mark.unit
def test_the_wrap_key_is_private_and_a_device_without_one_is_refused(tmp_path: Path, world: World) -> None:
    state = tmp_path / "fresh"
    public = create_wrap_key(state)
    path = wrap_key_path(state)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert public_key_raw(load_wrap_key(state).public_key()) == __import__("base64").b64decode(public)
    path.chmod(0o644)
    with pytest.raises(MisuseError, match="readable by others"):
        load_wrap_key(state)
    data = world.v2.sealed.read_bytes()
    with pytest.raises(BundleNotForThisDeviceError, match="no wrap key"):
        shutil.rmtree(tmp_path / "nokey", ignore_errors=True)
        ex = SealingExtractor(_Targets({recipients_target(world.v2.ref.sha256):
                                        _doc_for(world, data, world.v2).to_json()}, tmp_path),
                              "dev-a", lambda: load_wrap_key(tmp_path / "nokey"))
        (tmp_path / "b").write_bytes(data)
        (tmp_path / "out").mkdir()
        ex(tmp_path / "b", tmp_path / "out" / "x", expected_sha256=world.v2.ref.sha256)
