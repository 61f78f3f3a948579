"""The bundle file: an uncompressed POSIX (ustar) tar holding `manifest.json` then the model.

Uncompressed so that verifying a bundle costs about one pass over the bytes: models compress
poorly anyway, and a compressed archive invites decompression bombs. Reading is a single
forward pass over the file (`HashingReader`) that hashes *every* byte for the TUF whole-file
check while the members are validated and the model is copied and hashed into a fresh
temporary directory; the directory is renamed into place only when every check passed.

The rules each member header must meet, and the limits, live in `agent.contract.bundle_checks`.
See docs/bundle.md for the format and the limits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.contract.bundle_checks import (
    MANIFEST_NAME,
    MODEL_NAMES,
    BundleLimits,
    HashingReader,
    check_header,
    next_member,
    open_tar,
    read_member,
    refuse_compressed,
)
from agent.contract.manifest import Manifest, parse_manifest
from agent.durable_io import fsync_dir, fsync_fd
from agent.errors import BundleError, BundleManifestError, ManifestError, MisuseError
from agent.logs import log_event

log = logging.getLogger("edgefleet.bundle")


__all__ = [
    "DEFAULT_LIMITS",
    "MANIFEST_NAME",
    "MODEL_NAMES",
    "BundleLimits",
    "ExtractedBundle",
    "bundle_digest",
    "extract_bundle",
    "extract_stream",
    "read_manifest",
    "rebuild_bundle",
    "write_bundle",
]

_MEMBER_MODE = 0o644
DEFAULT_LIMITS = BundleLimits()


@dataclass(frozen=True)
class ExtractedBundle:
    """A verified bundle unpacked into `root` (which holds `manifest.json` and the model)."""

    manifest: Manifest
    root: Path
    model_path: Path
    bundle_sha256: str  # hex digest of the whole archive, as TUF records it
    bundle_size: int


def _parse_member_manifest(data: bytes) -> Manifest:
    try:
        return parse_manifest(data)
    except ManifestError as exc:
        raise BundleManifestError(f"bundle {exc}") from None


def read_manifest(bundle: Path | bytes, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
    """Read and validate only the manifest member (the first one) of a bundle.

    Raises `BundleError` (unsafe/malformed archive), `BundleManifestError` (invalid
    manifest; also a `ManifestError`) or `MisuseError` (missing file).
    """
    with (
        _open_raw(bundle, limits) as raw,
        HashingReader(raw, limits.max_bundle_bytes) as reader,
        open_tar(reader) as tar,
    ):
        info = next_member(tar)
        if info is None:
            raise BundleError("bundle is empty")
        check_header(info, 0, set(), limits, None)
        if info.name != MANIFEST_NAME:  # pragma: no cover - check_header enforces it
            raise BundleError("bundle has no manifest")
        return _parse_member_manifest(read_member(reader, info, limits, None, None))


@contextlib.contextmanager
def _open_raw(bundle: Path | bytes, limits: BundleLimits) -> Iterator[BinaryIO]:
    if isinstance(bundle, bytes | bytearray | memoryview):
        raw: BinaryIO = io.BytesIO(bytes(bundle))
        size = len(bundle)
    else:
        try:
            raw = open(bundle, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise MisuseError(f"cannot open bundle {bundle}: {exc.strerror}") from None
        size = os.fstat(raw.fileno()).st_size
    try:
        if size > limits.max_bundle_bytes:
            raise BundleError(f"bundle is {size} bytes, over the limit of {limits.max_bundle_bytes}")
        refuse_compressed(raw)
        yield raw
    finally:
        raw.close()


def _check_dest(dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise MisuseError(f"extraction destination {dest} already exists")
    if not dest.parent.is_dir():
        raise MisuseError(f"extraction destination's parent {dest.parent} is not a directory")
    return dest


def extract_bundle(
    bundle: Path,
    dest: Path,
    limits: BundleLimits = DEFAULT_LIMITS,
    *,
    expected_sha256: str | None = None,
    expected_length: int | None = None,
    durable: bool = True,
) -> ExtractedBundle:
    """Verify and unpack a bundle into the new directory `dest`, in one pass over the file.

    `expected_sha256`/`expected_length` are the TUF-signed whole-file hash and length; the
    file is hashed while it is extracted, so the check costs no second read. Everything is
    written into a fresh temporary directory beside `dest`, renamed to `dest` only on success
    and removed on failure. `durable` fsyncs the files and the parent directory.

    Raises `BundleError` (unsafe, malformed, over a limit, tampered or not the signed file),
    `BundleManifestError` (invalid manifest) or `MisuseError` (`dest` exists, file missing).
    """
    dest = _check_dest(dest)
    if expected_sha256 is not None:
        expected_sha256 = expected_sha256.removeprefix("sha256:").lower()
    with _open_raw(bundle, limits) as raw:
        if expected_length is not None:
            size = os.fstat(raw.fileno()).st_size
            if size != expected_length:
                raise BundleError(f"bundle is {size} bytes but the signed length is {expected_length}")

        def check(pos: int, digest: str) -> None:
            if expected_length is not None and pos != expected_length:
                raise BundleError(f"bundle read {pos} bytes but the signed length is {expected_length}")
            if expected_sha256 is not None and digest != expected_sha256:
                raise BundleError("bundle sha256 disagrees with the signed hash (tampered or wrong file)")

        return extract_stream(raw, dest, limits, durable=durable, check=check, label=str(bundle))


def extract_stream(
    raw: BinaryIO,
    dest: Path,
    limits: BundleLimits = DEFAULT_LIMITS,
    *,
    durable: bool = True,
    check: Callable[[int, str], None] | None = None,
    label: str = "stream",
) -> ExtractedBundle:
    """`extract_bundle` over a forward-only stream of plain bundle bytes (e.g. a decrypting one).

    `check(bytes_read, sha256_hex)` runs after the archive was read and before the rename (it
    raises to refuse). Raises like `extract_bundle`.
    """
    dest = _check_dest(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        with HashingReader(raw, limits.max_bundle_bytes) as reader:
            manifest, model_path = _extract_members(reader, tmp, limits, durable)
            reader.drain_zeros(limits.max_trailing_bytes, limits.chunk_bytes)
            digest = reader.hexdigest()
        if check is not None:
            check(reader.pos, digest)
        tmp.chmod(0o755)
        if durable:  # the members' names: an fsync of the parent below covers only `dest`
            fsync_dir(tmp)
        tmp.replace(dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, BundleError):
            log_event(log, "bundle.refused", logging.WARNING, bundle=label, reason=str(exc))
        raise
    if durable:
        fsync_dir(dest.parent)
    log_event(log, "bundle.extracted", bundle_id=manifest.bundle_id, dest=str(dest), sha256=digest)
    return ExtractedBundle(manifest, dest, dest / model_path.name, digest, reader.pos)


def _extract_members(
    reader: HashingReader, tmp: Path, limits: BundleLimits, durable: bool
) -> tuple[Manifest, Path]:
    seen: set[str] = set()
    manifest: Manifest | None = None
    model_path: Path | None = None
    total = 0
    with open_tar(reader) as tar:
        index = 0
        while (info := next_member(tar)) is not None:
            check_header(info, index, seen, limits, manifest)
            total += info.size
            if total > limits.max_total_bytes:
                raise BundleError(f"bundle members total over the limit of {limits.max_total_bytes} bytes")
            if manifest is None:
                data = read_member(reader, info, limits, None, None)
                manifest = _parse_member_manifest(data)
                _write_small(tmp / MANIFEST_NAME, data, durable)
            else:
                model_path = tmp / info.name
                sha = hashlib.sha256()
                with open(model_path, "xb") as out:
                    read_member(reader, info, limits, out, sha)
                    if durable:
                        out.flush()
                        fsync_fd(out.fileno())
                if "sha256:" + sha.hexdigest() != manifest.model_digest:
                    raise BundleError("bundle model sha256 disagrees with the manifest's model_digest")
            index += 1
    if manifest is None:
        raise BundleError("bundle is empty: no manifest")
    if model_path is None:
        raise BundleError(f"bundle is missing its model member {manifest.model_file!r}")
    return manifest, model_path


def _write_small(path: Path, data: bytes, durable: bool) -> None:
    with open(path, "xb") as out:
        out.write(data)
        if durable:
            out.flush()
            fsync_fd(out.fileno())


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = _MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _DigestingSource(io.RawIOBase):
    """Wraps the model source so the writer hashes exactly the bytes it archives."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._raw.read(-1 if size is None else size)
        self.sha.update(data)
        self.size += len(data)
        return data


def write_bundle(manifest: Manifest, model: bytes | Path, out: Path) -> Path:
    """Write a deterministic bundle atomically (temp file, fsync, `os.replace`).

    The model is streamed from a path (never read whole) and hashed as it is archived; the
    bundle is kept only if the bytes match `manifest.model_digest`/`model_size`.
    Raises `MisuseError` (digest/size mismatch, over a limit, unreadable model).
    """
    out = Path(out)
    manifest_bytes = manifest.to_json()
    if len(manifest_bytes) > DEFAULT_LIMITS.max_manifest_bytes:
        raise MisuseError(
            f"manifest is {len(manifest_bytes)} bytes, over {DEFAULT_LIMITS.max_manifest_bytes}"
        )
    if manifest.model_size > DEFAULT_LIMITS.max_model_bytes:
        raise MisuseError(f"model is {manifest.model_size} bytes, over {DEFAULT_LIMITS.max_model_bytes}")
    if not out.parent.is_dir():
        raise MisuseError(f"bundle output directory {out.parent} does not exist")
    try:
        src: BinaryIO = io.BytesIO(model) if isinstance(model, bytes) else open(model, "rb")  # noqa: SIM115
    except OSError as exc:
        raise MisuseError(f"cannot read model {model!s}: {exc.strerror}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with src, os.fdopen(fd, "wb") as f:
            digesting = _DigestingSource(src)
            with tarfile.TarFile(
                fileobj=f, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 20
            ) as tar:
                tar.addfile(_member(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
                try:
                    tar.addfile(_member(manifest.model_file, manifest.model_size), digesting)
                except OSError as exc:  # copyfileobj raises OSError("unexpected end of data")
                    raise MisuseError(
                        f"model is shorter than manifest model_size {manifest.model_size}"
                    ) from exc
            if digesting.read(1):
                raise MisuseError(f"model is longer than manifest model_size {manifest.model_size}")
            if "sha256:" + digesting.sha.hexdigest() != manifest.model_digest:
                raise MisuseError("manifest model_digest does not match the model bytes")
            f.flush()
            fsync_fd(f.fileno())
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    log_event(log, "bundle.written", bundle_id=manifest.bundle_id, path=str(out), size=out.stat().st_size)
    return out


def rebuild_bundle(manifest_bytes: bytes, model: Path, model_file: str, out: Path) -> Path:
    """Write the archive `write_bundle` would have written from these exact member bytes.

    Why: a device keeps only the extracted slot (manifest and model), yet a delta applies to the
    bundle file. The format is deterministic (fixed headers, mtime 0), so the slot's members give
    back the very bytes TUF signed; the caller checks that against the delta's base sha256. Not
    durable (a scratch file). Raises `OSError`.
    """
    size = Path(model).stat().st_size
    with open(model, "rb") as src, open(out, "xb") as f, tarfile.TarFile(
        fileobj=f, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 20
    ) as tar:
        tar.addfile(_member(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
        tar.addfile(_member(model_file, size), src)
    return out


def bundle_digest(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex of a whole file, streamed (the value TUF records for a target)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            sha.update(data)
    return sha.hexdigest()
