"""Delta updates on real files: a real TUF repository, real bundles, real deltas, real onnxruntime.

Each attack publishes a *signed* delta target (so TUF alone would accept its bytes) that must
still be refused for a specific reason; the device then fetches the full bundle by itself and
says so in its `delta_fallback` event, and the delta attempt leaves the slots as they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.contract.delta import DeltaHeader, apply_delta, encode_delta, file_sha256, read_header
from agent.errors import DeltaBaseError, DeltaFormatError, DeltaResultError
from agent.lifecycle import State
from agent.lifecycle.state_store import DesiredDelta, DesiredTarget
from fleet.registry.deltas import build_delta
from tests.support.lifecycle_world import Device, Repo, make_device, make_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    r = make_repo(tmp_path_factory.mktemp("repo"))
    r.publish("1.0.0", model_seed=0)
    r.publish("2.0.0", model_seed=1)
    r.publish("3.0.0", model_seed=2, golden_seed=2)
    return r


def _file(repo: Repo, bundle_id: str) -> Path:
    ref = repo.refs[bundle_id]
    dirname, _, base = ref.path.rpartition("/")
    return repo.repo.targets_dir / dirname / f"{ref.sha256}.{base}"


def _publish_delta(repo: Repo, name: str, data: bytes, base: str, tmp: Path) -> DesiredDelta:
    """Sign `data` as a delta target claiming to rebuild mlp-2.0.0 from `base`."""
    src = tmp / name
    src.write_bytes(data)
    ref = repo.repo.add_target(src, f"deltas/mlp/{name}", {"delta_of": "models/mlp/mlp-2.0.0.efb"})
    fmt = read_header(src.open("rb")).format
    return DesiredDelta(ref.path, ref.length, ref.sha256, base, repo.refs[base].sha256, fmt)


def _device_on_1(repo: Repo, tmp: Path) -> Device:
    dev = make_device(repo, tmp / "dev")
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0"))
    assert dev.lifecycle.start() is State.IDLE and dev.lifecycle.record.active == "mlp-1.0.0"
    return dev


def _slot_digests(dev: Device) -> dict[str, str]:
    root = dev.lifecycle.ctx.slots.root
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _update_with(repo: Repo, dev: Device, delta: DesiredDelta) -> None:
    target: DesiredTarget = repo.desired("mlp-2.0.0")
    dev.lifecycle.offer_desired(DesiredTarget(**{**target.__dict__, "delta": delta}))
    assert dev.lifecycle.run_until_stable() is State.IDLE
    assert dev.lifecycle.record.active == "mlp-2.0.0"


def _fetched(dev: Device) -> list[str]:
    fetcher = dev.lifecycle.ctx.trust.fetcher  # type: ignore[attr-defined]
    return [u.rsplit("/", 1)[-1] for u in fetcher.requested if "/targets/" in u]


@pytest.mark.integration
def test_delta_rebuilds_the_signed_bundle_without_fetching_it(repo: Repo, tmp_path: Path) -> None:
    built = build_delta(_file(repo, "mlp-1.0.0"), _file(repo, "mlp-2.0.0"))
    delta = _publish_delta(repo, "good.efd", built.data, "mlp-1.0.0", tmp_path)
    dev = _device_on_1(repo, tmp_path)
    _update_with(repo, dev, delta)
    ev = dev.event("delta_applied")
    assert ev["bundle"] == "mlp-2.0.0" and ev["measurements"]["fetched_bytes"] == delta.length
    assert "delta_fallback" not in dev.names()
    fetched = _fetched(dev)
    assert any(f.endswith("good.efd") for f in fetched)
    assert not any(f.endswith("mlp-2.0.0.efb") for f in fetched)  # the full bundle never crossed
    assert dev.lifecycle.ctx.slots.installed() == ["mlp-1.0.0", "mlp-2.0.0"]


def _attack(repo: Repo, tmp_path: Path, delta: DesiredDelta, expected: str) -> None:
    dev = _device_on_1(repo, tmp_path)
    before = _slot_digests(dev)
    target = repo.desired("mlp-2.0.0")
    dev.lifecycle.offer_desired(DesiredTarget(**{**target.__dict__, "delta": delta}))
    # one step at a time: the download (delta refused, then the full bundle) leaves the slots alone
    for _ in range(4):
        if dev.lifecycle.machine.step() is State.VERIFYING:
            break
    assert dev.lifecycle.state is State.VERIFYING
    assert _slot_digests(dev) == before
    assert [p.name for p in dev.lifecycle.ctx.slots.downloads.iterdir() if p.name.startswith(".")] == []
    ev = dev.event("delta_fallback")
    assert expected in ev["reason"] and "fetching the full bundle" in ev["reason"]
    assert "delta_applied" not in dev.names()
    assert dev.lifecycle.run_until_stable() is State.IDLE and dev.lifecycle.record.active == "mlp-2.0.0"
    assert any(f.endswith("mlp-2.0.0.efb") for f in _fetched(dev))


@pytest.mark.integration
def test_tampered_delta_refused_and_full_bundle_used(repo: Repo, tmp_path: Path) -> None:
    built = build_delta(_file(repo, "mlp-1.0.0"), _file(repo, "mlp-2.0.0"))
    delta = _publish_delta(repo, "tampered.efd", built.data, "mlp-1.0.0", tmp_path)
    served = repo.repo.targets_dir / "deltas/mlp" / f"{delta.sha256}.tampered.efd"
    data = bytearray(served.read_bytes())
    data[-10] ^= 0xFF  # same length, other bytes
    served.write_bytes(bytes(data))
    try:
        _attack(repo, tmp_path, delta, "TrustError")
    finally:
        served.write_bytes(built.data)


@pytest.mark.integration
def test_delta_for_another_base_refused(repo: Repo, tmp_path: Path) -> None:
    built = build_delta(_file(repo, "mlp-3.0.0"), _file(repo, "mlp-2.0.0"))  # made from 3.0.0
    delta = _publish_delta(repo, "other-base.efd", built.data, "mlp-1.0.0", tmp_path)  # named for 1.0.0
    _attack(repo, tmp_path, delta, "DeltaBaseError")


@pytest.mark.integration
def test_delta_whose_result_differs_from_the_signed_target_refused(repo: Repo, tmp_path: Path) -> None:
    import zstandard

    old, new = _file(repo, "mlp-1.0.0"), _file(repo, "mlp-2.0.0")
    wrong = bytearray(new.read_bytes())
    wrong[600] ^= 0x01  # one bit off the signed bundle, same length, header still claims the signed one
    header = DeltaHeader(format="zstd-patch", base_sha256=file_sha256(old), base_length=old.stat().st_size,
                         target_sha256=file_sha256(new), target_length=len(wrong))
    forged = encode_delta(header, zstandard.ZstdCompressor().compress(bytes(wrong)))
    delta = _publish_delta(repo, "wrong-result.efd", forged, "mlp-1.0.0", tmp_path)
    _attack(repo, tmp_path, delta, "DeltaResultError")


def test_apply_delta_errors_leave_no_file(repo: Repo, tmp_path: Path) -> None:
    old, new, other = _file(repo, "mlp-1.0.0"), _file(repo, "mlp-2.0.0"), _file(repo, "mlp-3.0.0")
    good = tmp_path / "good.efd"
    good.write_bytes(build_delta(old, new).data)
    sha, length = file_sha256(new), new.stat().st_size
    out = tmp_path / "out" / "rebuilt.efb"
    out.parent.mkdir()
    with pytest.raises(DeltaBaseError, match="not the active bundle"):
        apply_delta(other, good, out, expected_sha256=sha, expected_length=length)
    with pytest.raises(DeltaFormatError, match="not the signed target"):
        apply_delta(old, good, out, expected_sha256=file_sha256(other), expected_length=length)
    truncated = tmp_path / "truncated.efd"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises((DeltaFormatError, DeltaResultError)):  # ends early: short output or bad frame
        apply_delta(old, truncated, out, expected_sha256=sha, expected_length=length)
    bad_magic = tmp_path / "magic.efd"
    bad_magic.write_bytes(b"XXXX" + good.read_bytes()[4:])
    with pytest.raises(DeltaFormatError, match="bad magic"):
        apply_delta(old, bad_magic, out, expected_sha256=sha, expected_length=length)
    # ops that read past the base are refused by the header's own checks
    raw = good.read_bytes()
    hdr = json.loads(raw[8:8 + int.from_bytes(raw[4:8], "big")])
    if hdr["format"] == "tensor-diff":
        hdr["ops"] = [["D", length, 10**9]]
    else:
        hdr["ops"] = [["L", length]]
    body = json.dumps(hdr).encode()
    evil = tmp_path / "evil.efd"
    evil.write_bytes(b"EFD1" + len(body).to_bytes(4, "big") + body)
    with pytest.raises(DeltaFormatError, match="invalid delta header"):
        apply_delta(old, evil, out, expected_sha256=sha, expected_length=length)
    assert list(out.parent.iterdir()) == []
    assert apply_delta(old, good, out, expected_sha256=sha, expected_length=length) == out
    assert file_sha256(out) == sha
