"""The bundle file: round trip, tampering, and hand-crafted hostile archives.

Every refusal must raise `BundleError` naming the problem and leave the destination's
parent exactly as it was (the temporary directory is removed).
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import lzma
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.contract.bundle import (
    BundleLimits,
    bundle_digest,
    extract_bundle,
    read_manifest,
    write_bundle,
)
from agent.contract.manifest import Manifest, TensorSpec
from agent.errors import BundleError, BundleManifestError, ManifestError, MisuseError

MODEL = bytes(range(256)) * 40  # 10 KiB stand-in payload: the format does not look inside


def _manifest(model: bytes = MODEL, **over: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "mlp",
        "version": "1.2.3",
        "runtime": "onnx",
        "model_file": "model.onnx",
        "model_digest": "sha256:" + hashlib.sha256(model).hexdigest(),
        "model_size": len(model),
        "inputs": [TensorSpec(name="x", dtype="float32", shape=[None, 32])],
        "outputs": [TensorSpec(name="logits", dtype="float32", shape=[None, 4])],
    }
    fields.update(over)
    return Manifest(**fields)  # type: ignore[arg-type]


def _info(name: str, size: int = 0, type_: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mode = size, type_, linkname, 0o644
    return info


def _craft(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _good_members(
    manifest: Manifest | None = None, model: bytes = MODEL
) -> list[tuple[tarfile.TarInfo, bytes]]:
    mbytes = (manifest or _manifest(model)).to_json()
    return [(_info("manifest.json", len(mbytes)), mbytes), (_info("model.onnx", len(model)), model)]


def _refused(tmp_path: Path, data: bytes, match: str, limits: BundleLimits | None = None) -> BundleError:
    """Write `data` as a bundle, extract it, and check the refusal and the clean parent."""
    src = tmp_path / "in.efb"
    src.write_bytes(data)
    parent = tmp_path / "slots"
    parent.mkdir()
    before = sorted(parent.iterdir())
    with pytest.raises(BundleError, match=match) as err:
        extract_bundle(src, parent / "slot-b", limits or BundleLimits())
    assert sorted(parent.iterdir()) == before
    return err.value


@pytest.mark.integration
def test_round_trip_is_deterministic_and_verifies(tmp_path: Path) -> None:
    manifest = _manifest()
    (tmp_path / "model.onnx").write_bytes(MODEL)
    a = write_bundle(manifest, MODEL, tmp_path / "a.efb")
    b = write_bundle(manifest, tmp_path / "model.onnx", tmp_path / "b.efb")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a, "r:") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["manifest.json", "model.onnx"]
    assert {(i.mtime, i.uid, i.gid, i.mode) for i in infos} == {(0, 0, 0, 0o644)}
    assert read_manifest(a) == manifest
    assert read_manifest(a.read_bytes()) == manifest
    out = extract_bundle(
        a, tmp_path / "slot", expected_sha256=bundle_digest(a), expected_length=a.stat().st_size
    )
    assert out.manifest == manifest
    assert out.model_path.read_bytes() == MODEL
    assert out.bundle_sha256 == hashlib.sha256(a.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.root.iterdir()) == ["manifest.json", "model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.efb", "b.efb", "model.onnx", "slot"]


@pytest.mark.integration
def test_write_refuses_a_model_that_disagrees_with_the_manifest(tmp_path: Path) -> None:
    with pytest.raises(MisuseError, match="model_digest"):
        write_bundle(_manifest(), MODEL[:-1] + b"\x00", tmp_path / "x.efb")
    with pytest.raises(MisuseError, match="shorter"):
        write_bundle(_manifest(), MODEL[:-10], tmp_path / "x.efb")
    with pytest.raises(MisuseError, match="longer"):
        write_bundle(_manifest(), MODEL + b"extra", tmp_path / "x.efb")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_destination_that_exists_is_misuse(tmp_path: Path) -> None:
    bundle = write_bundle(_manifest(), MODEL, tmp_path / "a.efb")
    (tmp_path / "slot").mkdir()
    with pytest.raises(MisuseError, match="already exists"):
        extract_bundle(bundle, tmp_path / "slot")
    with pytest.raises(MisuseError, match="not a directory"):
        extract_bundle(bundle, tmp_path / "missing" / "slot")
    with pytest.raises(MisuseError, match="cannot open bundle"):
        extract_bundle(tmp_path / "nope.efb", tmp_path / "slot2")
    with pytest.raises(MisuseError, match="does not exist"):
        write_bundle(_manifest(), MODEL, tmp_path / "missing" / "b.efb")


@pytest.mark.integration
def test_tampered_model_bytes_fail_the_model_digest(tmp_path: Path) -> None:
    data = bytearray(write_bundle(_manifest(), MODEL, tmp_path / "a.efb").read_bytes())
    offset = data.index(MODEL[:512]) + 100
    data[offset] ^= 0xFF
    (tmp_path / "a.efb").unlink()
    _refused(tmp_path, bytes(data), "model sha256 disagrees with the manifest")


@pytest.mark.integration
def test_signed_hash_and_length_are_checked(tmp_path: Path) -> None:
    bundle = write_bundle(_manifest(), MODEL, tmp_path / "a.efb")
    with pytest.raises(BundleError, match="signed hash"):
        extract_bundle(bundle, tmp_path / "s1", expected_sha256="sha256:" + "0" * 64)
    with pytest.raises(BundleError, match="signed length"):
        extract_bundle(bundle, tmp_path / "s2", expected_length=bundle.stat().st_size + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.efb"]


@pytest.mark.integration
def test_manifest_schema_violation_is_a_manifest_error(tmp_path: Path) -> None:
    for i, (changes, message) in enumerate((
        ({"version": "not-semver"}, "invalid manifest: version must be a semantic version"),
        ({"extra_field": 1}, "invalid manifest: extra_field: unknown field"),
    )):
        bad = _manifest().model_dump(mode="json") | changes
        mbytes = __import__("json").dumps(bad).encode()
        members = [(_info("manifest.json", len(mbytes)), mbytes), (_info("model.onnx", len(MODEL)), MODEL)]
        data = _craft(members)
        (tmp_path / str(i)).mkdir()
        err = _refused(tmp_path / str(i), data, message)
        assert isinstance(err, BundleManifestError) and isinstance(err, ManifestError)
        with pytest.raises(BundleManifestError):
            read_manifest(data)


@pytest.mark.integration
def test_manifest_size_that_disagrees_with_the_model(tmp_path: Path) -> None:
    members = _good_members(_manifest(model_size=len(MODEL) + 1))
    _refused(tmp_path, _craft(members), "header size 10240 disagrees with manifest model_size 10241")


@pytest.mark.integration
def test_truncated_bundle(tmp_path: Path) -> None:
    data = write_bundle(_manifest(), MODEL, tmp_path / "a.efb").read_bytes()
    (tmp_path / "a.efb").unlink()
    _refused(tmp_path, data[: 512 * 4 + 3000], "truncated")


@pytest.mark.integration
def test_header_that_lies_about_its_size(tmp_path: Path) -> None:
    # Header and manifest both claim 4 KiB more than the archive holds.
    manifest = _manifest(model_size=len(MODEL) + 4096)
    mbytes = manifest.to_json()
    data = bytearray(
        _craft([(_info("manifest.json", len(mbytes)), mbytes), (_info("model.onnx", len(MODEL)), MODEL)])
    )
    hdr = data.index(b"model.onnx\x00")
    data[hdr + 124 : hdr + 136] = b"%011o\x00" % (len(MODEL) + 4096)
    data[hdr + 148 : hdr + 156] = b" " * 8
    data[hdr + 148 : hdr + 156] = b"%06o\x00 " % sum(data[hdr : hdr + 512])
    data = data[: hdr + 512 + len(MODEL) + 1024]  # end the file before the claimed size
    _refused(tmp_path, bytes(data), "truncated")
    # A header claiming less than the data: the rest is not a valid header and is refused.
    short = bytearray(_craft(_good_members()))
    hdr = short.index(b"model.onnx\x00")
    short[hdr + 124 : hdr + 136] = b"%011o\x00" % 512
    short[hdr + 148 : hdr + 156] = b" " * 8
    short[hdr + 148 : hdr + 156] = b"%06o\x00 " % sum(short[hdr : hdr + 512])
    (tmp_path / "slots").rmdir()
    _refused(tmp_path, bytes(short), "disagrees with manifest model_size")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../manifest.json", r"path traversal"),
        ("a/../../etc/passwd", r"path traversal"),
        ("/etc/passwd", r"absolute path"),
        ("notes.txt", r"unknown member 'notes.txt'"),
        ("model.onnx", r"first member must be 'manifest.json'"),
    ],
)
def test_bad_member_names(tmp_path: Path, name: str, match: str) -> None:
    _refused(tmp_path, _craft([(_info(name, len(MODEL)), MODEL)]), match)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("type_", "linkname", "match"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "is a symlink"),
        (tarfile.LNKTYPE, "manifest.json", "is a hard link"),
        (tarfile.CHRTYPE, "", "character device"),
        (tarfile.BLKTYPE, "", "block device"),
        (tarfile.FIFOTYPE, "", "is a FIFO"),
        (tarfile.DIRTYPE, "", "is a directory"),
        (tarfile.CONTTYPE, "", "unsupported type"),
    ],
)
def test_non_regular_members_are_refused(tmp_path: Path, type_: bytes, linkname: str, match: str) -> None:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = list(_good_members()[:1])
    members.append((_info("model.onnx", 0, type_, linkname), None))
    _refused(tmp_path, _craft(members), match)


@pytest.mark.integration
def test_duplicate_and_unexpected_members(tmp_path: Path) -> None:
    good = _good_members()
    _refused(tmp_path, _craft([good[0], good[0], good[1]]), "duplicate member 'manifest.json'")
    (tmp_path / "slots").rmdir()
    _refused(tmp_path, _craft([good[0], good[1], good[1]]), "duplicate member 'model.onnx'")
    (tmp_path / "slots").rmdir()
    extra = (_info("model.tflite", 4), b"abcd")
    _refused(tmp_path, _craft([good[0], good[1], extra]), "not the manifest's model_file")
    (tmp_path / "slots").rmdir()
    _refused(tmp_path, _craft(good[:1]), "missing its model member")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (BundleLimits(max_model_bytes=4096), "model is 10240 bytes, over the limit of 4096"),
        (BundleLimits(max_manifest_bytes=64), "manifest is .* bytes, over the limit of 64"),
        (BundleLimits(max_total_bytes=8192), "total over the limit of 8192"),
        (BundleLimits(max_members=1), "more than 1 members"),
        (BundleLimits(max_bundle_bytes=8192), "over the limit of 8192"),
    ],
)
def test_limits(tmp_path: Path, limits: BundleLimits, match: str) -> None:
    _refused(tmp_path, _craft(_good_members()), match, limits)


@pytest.mark.integration
def test_too_many_members(tmp_path: Path) -> None:
    good = _good_members()
    _refused(
        tmp_path, _craft([*good, (_info("x", 1), b"x")]), "more than 2 members", BundleLimits(max_members=2)
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("compress", "kind"),
    [(gzip.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "xz")],
)
def test_compressed_bombs_are_refused_before_decompressing(
    tmp_path: Path, compress: object, kind: str
) -> None:
    zeros = b"\x00" * (8 << 20)
    bomb = compress(_craft(_good_members(model=zeros)))  # type: ignore[operator]
    assert len(bomb) < (1 << 20)
    _refused(tmp_path, bomb, f"{kind}-compressed")
    with pytest.raises(BundleError, match=f"{kind}-compressed"):
        read_manifest(bomb)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("fmt", "match"), [(tarfile.PAX_FORMAT, "PAX"), (tarfile.GNU_FORMAT, "GNU long name")]
)
def test_extension_headers_are_refused(tmp_path: Path, fmt: int, match: str) -> None:
    good = _good_members()
    long_name = "m" * 150
    _refused(tmp_path, _craft([good[0], (_info(long_name, 4), b"abcd")], fmt), match)


@pytest.mark.integration
def test_garbage_after_the_archive_is_refused(tmp_path: Path) -> None:
    data = write_bundle(_manifest(), MODEL, tmp_path / "a.efb").read_bytes()
    (tmp_path / "a.efb").unlink()
    _refused(tmp_path, data + b"smuggled", "non-zero data after the end")


@pytest.mark.unit
def test_empty_and_non_tar_input() -> None:
    with pytest.raises(BundleError, match="not a valid tar"):
        read_manifest(b"")
    with pytest.raises(BundleError, match="not a valid tar"):
        read_manifest(b"hello" * 200)


@pytest.mark.unit
def test_limits_must_be_positive() -> None:
    with pytest.raises(MisuseError, match="max_members"):
        BundleLimits(max_members=0)


@functools.cache
def _good_bundle_bytes() -> bytes:
    return _craft(_good_members())


@pytest.mark.integration
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 3 * 512 + len(MODEL) + 1024), st.integers(1, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 3 * 512 + len(MODEL) + 1024)),
)
def test_corrupted_bundles_fail_only_with_bundle_error(
    tmp_path: Path, flips: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(_good_bundle_bytes())
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    if cut is not None:
        data = data[:cut]
    src = tmp_path / "fuzz.efb"
    src.write_bytes(bytes(data))
    dest = tmp_path / "fuzz-out"
    try:
        out = extract_bundle(src, dest, durable=False)
    except BundleError:
        assert not dest.exists()
    else:  # a flip that only touched padding or header fields we do not use
        assert out.model_path.read_bytes() == MODEL
        shutil.rmtree(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fuzz.efb"]
