"""The bundle file: an uncompressed POSIX (ustar) tar holding `manifest.json` then the model.

Uncompressed so that verifying a bundle costs about one pass over the bytes: models compress
poorly anyway, and a compressed archive invites decompression bombs. Reading is a single
forward pass over the file (`_HashingReader`) that hashes *every* byte for the TUF whole-file
check while the members are validated and the model is copied and hashed into a fresh
temporary directory; the directory is renamed into place only when every check passed.

Member headers are validated here, before any data is read; `tarfile` is used only to parse
headers and frame member data (never `extract`/`extractall`, so no extraction filter is relied
on). PAX and GNU extension headers are refused because they carry unbounded payloads that
`tarfile` would read into memory before we could look at them; the writer never produces them.
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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from agent.contract.manifest import Manifest, parse_manifest
from agent.errors import BundleError, BundleManifestError, ManifestError, MisuseError
from agent.logs import log_event

log = logging.getLogger("edgefleet.bundle")

MANIFEST_NAME = "manifest.json"
MODEL_NAMES = frozenset({"model.onnx", "model.tflite"})
_MEMBER_MODE = 0o644
_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
)
_EXTENSION_TYPES = {
    tarfile.XHDTYPE: "PAX extended header",
    tarfile.XGLTYPE: "PAX global header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link",
    tarfile.GNUTYPE_SPARSE: "GNU sparse file",
}


@dataclass(frozen=True)
class BundleLimits:
    """Hard limits applied while reading an untrusted bundle (bytes unless stated)."""

    max_bundle_bytes: int = 1 << 30
    max_manifest_bytes: int = 8 << 20
    max_model_bytes: int = 512 << 20
    max_members: int = 8
    max_total_bytes: int = (512 + 8) << 20  # sum of member sizes declared in headers
    max_trailing_bytes: int = 1 << 20  # zero padding allowed after the end-of-archive marker
    chunk_bytes: int = 1 << 20  # bounded read size while copying

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value <= 0:
                raise MisuseError(f"BundleLimits.{name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = BundleLimits()


@dataclass(frozen=True)
class ExtractedBundle:
    """A verified bundle unpacked into `root` (which holds `manifest.json` and the model)."""

    manifest: Manifest
    root: Path
    model_path: Path
    bundle_sha256: str  # hex digest of the whole archive, as TUF records it
    bundle_size: int


class _RefusedHeader(BundleError):
    """Raised from inside tarfile's header parsing (propagates through `TarFile.next`)."""


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that refuses extension headers before tarfile reads their payload."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        kind = _EXTENSION_TYPES.get(self.type)
        if kind is not None:
            raise _RefusedHeader(f"bundle member header is a {kind}, which bundles never contain")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class _HashingReader(io.RawIOBase):
    """Forward-only reader that sha256-hashes every byte it passes on (or skips).

    `tarfile` in "r:" mode reads headers and data in order and seeks only forward; a
    forward seek is served by reading (and hashing) the skipped bytes, so the digest covers
    the whole file after `drain()`. A backward seek is refused.
    """

    def __init__(self, raw: BinaryIO, max_bytes: int) -> None:
        super().__init__()
        self._raw = raw
        self._max = max_bytes
        self.pos = 0
        self._sha = hashlib.sha256()
        # hashlib releases the GIL on large updates: hashing the whole file on a worker thread
        # overlaps it with hashing and writing the model member on the caller's thread.
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-sha256")
        self._pending: deque[Future[None]] = deque()

    def _wait(self, keep: int) -> None:
        # At most `keep` chunks in flight, so memory stays bounded by a few chunks.
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        """The whole-file digest of everything read so far (waits for the worker)."""
        self._wait(0)
        return self._sha.hexdigest()

    def close(self) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise BundleError("internal: unbounded read of a bundle")
        data = self._raw.read(size)
        self.pos += len(data)
        if self.pos > self._max:
            raise BundleError(f"bundle is larger than the limit of {self._max} bytes")
        if len(data) >= 1 << 16:
            self._wait(1)
            self._pending.append(self._hasher.submit(self._sha.update, data))
        elif data:
            self._wait(0)
            self._sha.update(data)
        return data

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        target = pos if whence == io.SEEK_SET else self.pos + pos if whence == io.SEEK_CUR else -1
        if target < self.pos:
            raise BundleError("bundle is not a plain sequential tar (backward seek)")
        while self.pos < target:
            if not self.read(min(target - self.pos, 1 << 20)):
                break
        return self.pos

    def drain_zeros(self, limit: int, chunk: int) -> None:
        """Read to EOF; trailing bytes after the archive must be zero padding within `limit`."""
        trailing = 0
        while data := self.read(chunk):
            trailing += len(data)
            if trailing > limit:
                raise BundleError(f"bundle has more than {limit} bytes after the end of the archive")
            if data.count(0) != len(data):
                raise BundleError("bundle has non-zero data after the end of the archive")


def _refuse_compressed(raw: BinaryIO) -> None:
    head = raw.read(8)
    raw.seek(0)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            raise BundleError(f"bundle is {kind}-compressed; bundles are plain uncompressed tar")


def _check_header(
    info: tarfile.TarInfo, index: int, seen: set[str], limits: BundleLimits, manifest: Manifest | None
) -> None:
    """Validate one member header before any of its data is read. Raises `BundleError`."""
    name = info.name
    if index >= limits.max_members:
        raise BundleError(f"bundle has more than {limits.max_members} members")
    for test, what in (
        (info.issym, "a symlink"),
        (info.islnk, "a hard link"),
        (info.ischr, "a character device file"),
        (info.isblk, "a block device file"),
        (info.isfifo, "a FIFO"),
        (info.isdir, "a directory"),
    ):
        if test():
            raise BundleError(f"bundle member {name!r} is {what}; only regular files are allowed")
    if not info.isreg() or info.type == tarfile.CONTTYPE:
        raise BundleError(f"bundle member {name!r} has unsupported type {info.type!r}")
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute():
        raise BundleError(f"bundle member {name!r} has an absolute path")
    if ".." in path.parts or ".." in name.split("\\"):
        raise BundleError(f"bundle member {name!r} has a path traversal ('..')")
    if name in seen:
        raise BundleError(f"bundle has a duplicate member {name!r}")
    if name != MANIFEST_NAME and name not in MODEL_NAMES:
        raise BundleError(f"bundle has an unknown member {name!r}")
    if index == 0 and name != MANIFEST_NAME:
        raise BundleError(f"bundle's first member must be {MANIFEST_NAME!r}, got {name!r}")
    if manifest is not None and name != manifest.model_file:
        raise BundleError(f"bundle member {name!r} is not the manifest's model_file {manifest.model_file!r}")
    if info.size < 0:
        raise BundleError(f"bundle member {name!r} has a negative size")
    if name == MANIFEST_NAME and info.size > limits.max_manifest_bytes:
        raise BundleError(
            f"bundle manifest is {info.size} bytes, over the limit of {limits.max_manifest_bytes}"
        )
    if name in MODEL_NAMES:
        if info.size > limits.max_model_bytes:
            raise BundleError(
                f"bundle model is {info.size} bytes, over the limit of {limits.max_model_bytes}"
            )
        if manifest is not None and info.size != manifest.model_size:
            raise BundleError(
                f"bundle model header size {info.size} disagrees with "
                f"manifest model_size {manifest.model_size}"
            )
    seen.add(name)


def _read_member(
    reader: _HashingReader,
    info: tarfile.TarInfo,
    limits: BundleLimits,
    sink: BinaryIO | None,
    sha: hashlib._Hash | None,
) -> bytes:
    """Copy a member's data in bounded chunks; return it only when `sink` is None (small members).

    Reads straight from the hashing reader (tarfile only framed the member), which saves a
    buffered copy per byte; tarfile then seeks forward past the padding to the next header.
    """
    if reader.tell() != info.offset_data:
        raise BundleError(f"bundle member {info.name!r} data does not follow its header")
    parts: list[bytes] = []
    remaining = info.size
    while remaining > 0:
        data = reader.read(min(remaining, limits.chunk_bytes))
        if not data:
            break
        remaining -= len(data)
        if sha is not None:
            sha.update(data)
        if sink is None:
            parts.append(data)
        else:
            sink.write(data)
    if remaining:
        raise BundleError(
            f"bundle member {info.name!r} is truncated: header says {info.size} bytes, "
            f"archive holds {info.size - remaining}"
        )
    return b"".join(parts)


def _parse_member_manifest(data: bytes) -> Manifest:
    try:
        return parse_manifest(data)
    except ManifestError as exc:
        raise BundleManifestError(f"bundle {exc}") from None


def _open_tar(reader: _HashingReader) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=reader, mode="r:", tarinfo=_StrictTarInfo)
    except tarfile.TarError as exc:
        raise BundleError(f"bundle is not a valid tar archive: {exc}") from None


def _next(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except tarfile.TarError as exc:
        raise BundleError(f"bundle has a corrupt member header: {exc}") from None


def read_manifest(bundle: Path | bytes, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
    """Read and validate only the manifest member (the first one) of a bundle.

    Raises `BundleError` (unsafe/malformed archive), `BundleManifestError` (invalid
    manifest; also a `ManifestError`) or `MisuseError` (missing file).
    """
    with (
        _open_raw(bundle, limits) as raw,
        _HashingReader(raw, limits.max_bundle_bytes) as reader,
        _open_tar(reader) as tar,
    ):
        info = _next(tar)
        if info is None:
            raise BundleError("bundle is empty")
        _check_header(info, 0, set(), limits, None)
        if info.name != MANIFEST_NAME:  # pragma: no cover - _check_header enforces it
            raise BundleError("bundle has no manifest")
        return _parse_member_manifest(_read_member(reader, info, limits, None, None))


@contextlib.contextmanager
def _open_raw(bundle: Path | bytes, limits: BundleLimits):  # type: ignore[no-untyped-def]
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
        _refuse_compressed(raw)
        yield raw
    finally:
        raw.close()


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
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise MisuseError(f"extraction destination {dest} already exists")
    if not dest.parent.is_dir():
        raise MisuseError(f"extraction destination's parent {dest.parent} is not a directory")
    if expected_sha256 is not None:
        expected_sha256 = expected_sha256.removeprefix("sha256:").lower()
    with _open_raw(bundle, limits) as raw:
        if expected_length is not None:
            size = os.fstat(raw.fileno()).st_size
            if size != expected_length:
                raise BundleError(f"bundle is {size} bytes but the signed length is {expected_length}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        try:
            with _HashingReader(raw, limits.max_bundle_bytes) as reader:
                manifest, model_path = _extract_members(reader, tmp, limits, durable)
                reader.drain_zeros(limits.max_trailing_bytes, limits.chunk_bytes)
                digest = reader.hexdigest()
            if expected_length is not None and reader.pos != expected_length:
                raise BundleError(
                    f"bundle read {reader.pos} bytes but the signed length is {expected_length}"
                )
            if expected_sha256 is not None and digest != expected_sha256:
                raise BundleError("bundle sha256 disagrees with the signed hash (tampered or wrong file)")
            tmp.chmod(0o755)
            tmp.replace(dest)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, BundleError):
                log_event(log, "bundle.refused", logging.WARNING, bundle=str(bundle), reason=str(exc))
            raise
    if durable:
        _fsync_dir(dest.parent)
    log_event(log, "bundle.extracted", bundle_id=manifest.bundle_id, dest=str(dest), sha256=digest)
    return ExtractedBundle(manifest, dest, dest / model_path.name, digest, reader.pos)


def _extract_members(
    reader: _HashingReader, tmp: Path, limits: BundleLimits, durable: bool
) -> tuple[Manifest, Path]:
    seen: set[str] = set()
    manifest: Manifest | None = None
    model_path: Path | None = None
    total = 0
    with _open_tar(reader) as tar:
        index = 0
        while (info := _next(tar)) is not None:
            _check_header(info, index, seen, limits, manifest)
            total += info.size
            if total > limits.max_total_bytes:
                raise BundleError(f"bundle members total over the limit of {limits.max_total_bytes} bytes")
            if manifest is None:
                data = _read_member(reader, info, limits, None, None)
                manifest = _parse_member_manifest(data)
                _write_small(tmp / MANIFEST_NAME, data, durable)
            else:
                model_path = tmp / info.name
                sha = hashlib.sha256()
                with open(model_path, "xb") as out:
                    _read_member(reader, info, limits, out, sha)
                    if durable:
                        out.flush()
                        os.fsync(out.fileno())
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
            os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            os.fsync(f.fileno())
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)
    log_event(log, "bundle.written", bundle_id=manifest.bundle_id, path=str(out), size=out.stat().st_size)
    return out


def bundle_digest(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex of a whole file, streamed (the value TUF records for a target)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            sha.update(data)
    return sha.hexdigest()
