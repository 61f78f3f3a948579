"""Validation rules for untrusted bundle archives: limits, header checks, the hashing reader.

Split from `agent.contract.bundle` (the public API) so the rules an attacker's archive meets
are in one place. Every member header is checked here before any of its data is read;
`tarfile` is used only to parse headers and frame data (never to extract). PAX and GNU
extension headers are refused while tarfile parses them, because they carry unbounded
payloads tarfile would read into memory first; the writer never produces them.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from agent.contract.manifest import Manifest
from agent.errors import BundleError, MisuseError

MANIFEST_NAME = "manifest.json"
MODEL_NAMES = frozenset({"model.onnx", "model.tflite"})
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


class RefusedHeader(BundleError):
    """Raised from inside tarfile's header parsing (propagates through `TarFile.next`)."""


class StrictTarInfo(tarfile.TarInfo):
    """TarInfo that refuses extension headers before tarfile reads their payload."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        kind = _EXTENSION_TYPES.get(self.type)
        if kind is not None:
            raise RefusedHeader(f"bundle member header is a {kind}, which bundles never contain")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class HashingReader(io.RawIOBase):
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


def refuse_compressed(raw: BinaryIO) -> None:
    head = raw.read(8)
    raw.seek(0)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            raise BundleError(f"bundle is {kind}-compressed; bundles are plain uncompressed tar")


def check_header(
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


def read_member(
    reader: HashingReader,
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


def open_tar(reader: HashingReader) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=reader, mode="r:", tarinfo=StrictTarInfo)
    except tarfile.TarError as exc:
        raise BundleError(f"bundle is not a valid tar archive: {exc}") from None


def next_member(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except tarfile.TarError as exc:
        raise BundleError(f"bundle has a corrupt member header: {exc}") from None
