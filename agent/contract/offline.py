"""Offline update files (`.efo`): a TUF repository slice and director documents in one archive.

Why: air-gapped devices (and devices whose link is down for weeks) must be updatable from a USB
stick *without* weakening verification. The file carries exactly what the broker would have
delivered, so the agent checks it with the same TUF client (a `DirectoryFetcher` over the
extracted slice instead of the MQTT fetcher), the same director gate (signature, sequence,
expiry, addressee) and the same lifecycle. Nothing in the file is trusted until then; this
module only makes extraction safe.

Layout: an uncompressed ustar archive whose members are, in any order::

    offline.json                                  {"schema_version": 1, "target": <TUF target path>}
    metadata/<N>.root.json  metadata/timestamp.json  metadata/<N>.snapshot.json  metadata/<N>.targets.json
    targets/<dirs>/<sha256>.<name>                the bundle (consistent-snapshot name)
    director/device-<id>.json | director/cohort-<name>.json

Extraction refuses: any member that is not a regular file (links, devices, directories are
skipped only if they are plain directories), names outside the layout (absolute, `..`, hidden
or empty segments, backslashes), duplicate names, more than `max_members` members, a member or
total over its cap, and a truncated archive. Each refusal is an `OfflineImportError` naming it.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.errors import OfflineImportError

INDEX_NAME = "offline.json"
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}"
_METADATA = re.compile(r"^metadata/([0-9]{1,9}\.(root|snapshot|targets)|timestamp)\.json\Z")
_TARGET = re.compile(rf"^targets/({_SEGMENT}/){{0,8}}[0-9a-f]{{64}}\.{_SEGMENT}\Z")
_DIRECTOR = re.compile(r"^director/(device|cohort)-([A-Za-z0-9][A-Za-z0-9._:-]{0,127})\.json\Z")


@dataclass(frozen=True)
class OfflineLimits:
    """Caps while reading an untrusted offline file (bytes)."""

    max_members: int = 512
    max_metadata_bytes: int = 5_000_000
    max_director_bytes: int = 64 * 1024
    max_target_bytes: int = 512 * 1024 * 1024
    max_total_bytes: int = 600 * 1024 * 1024


@dataclass(frozen=True)
class OfflinePackage:
    """A safely extracted offline file: a repository slice under `root`, and director documents."""

    root: Path
    target: str  # the TUF target path the file is about (a hint: the director document decides)
    directors: dict[str, bytes]  # `device:<id>` / `cohort:<name>` -> untrusted envelope bytes

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _cap(name: str, limits: OfflineLimits) -> int:
    if name == INDEX_NAME:
        return 4096
    if _METADATA.fullmatch(name):
        return limits.max_metadata_bytes
    if _TARGET.fullmatch(name):
        return limits.max_target_bytes
    if _DIRECTOR.fullmatch(name):
        return limits.max_director_bytes
    raise OfflineImportError(f"offline file member {name!r} is outside the layout (path traversal?)")


def _copy(src: IO[bytes], dest: Path, size: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as out:
        left = size
        while left:
            data = src.read(min(left, 1 << 20))
            if not data:
                raise OfflineImportError(f"offline file is truncated inside {dest.name}")
            out.write(data)
            left -= len(data)


def read_offline(path: Path, work_dir: Path, limits: OfflineLimits | None = None) -> OfflinePackage:
    """Check and extract the offline file `path` into a new directory under `work_dir`.

    Raises `OfflineImportError` (malformed, truncated, unsafe member, over a cap). On error
    nothing is left behind.
    """
    limits = limits or OfflineLimits()
    work_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="offline-", dir=work_dir))
    try:
        return _extract(Path(path), root, limits)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _extract(path: Path, root: Path, limits: OfflineLimits) -> OfflinePackage:
    seen: set[str] = set()
    total = 0
    directors: dict[str, bytes] = {}
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            while (info := tar.next()) is not None:
                name = info.name
                if info.isdir() and not name.startswith("/") and ".." not in name.split("/"):
                    continue
                if not info.isreg():
                    raise OfflineImportError(f"offline file member {name!r} is not a regular file")
                if name in seen:
                    raise OfflineImportError(f"offline file has {name!r} twice")
                seen.add(name)
                if len(seen) > limits.max_members:
                    raise OfflineImportError(f"offline file has more than {limits.max_members} members")
                cap = _cap(name, limits)
                if info.size > cap:
                    raise OfflineImportError(f"offline file member {name!r} is {info.size} bytes, over {cap}")
                total += info.size
                if total > limits.max_total_bytes:
                    raise OfflineImportError(
                        f"offline file members total over {limits.max_total_bytes} bytes")
                src = tar.extractfile(info)
                assert src is not None  # a regular file
                _copy(src, root / name, info.size)
                match = _DIRECTOR.fullmatch(name)
                if match:
                    directors[f"{match.group(1)}:{match.group(2)}"] = (root / name).read_bytes()
    except (tarfile.TarError, EOFError) as exc:
        raise OfflineImportError(f"offline file is not a complete archive (truncated?): {exc}") from None
    except OSError as exc:
        raise OfflineImportError(f"cannot read the offline file {path}: {exc}") from exc
    if INDEX_NAME not in seen:
        raise OfflineImportError(f"offline file has no {INDEX_NAME} (truncated or not an offline file)")
    try:
        index = json.loads((root / INDEX_NAME).read_bytes())
        target = str(index["target"]) if index.get("schema_version") == 1 else ""
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OfflineImportError(f"offline file index is malformed: {exc!r}") from None
    if not target:
        raise OfflineImportError("offline file index is malformed: no target or unknown schema_version")
    if not directors:
        raise OfflineImportError("offline file carries no director document")
    if not any(_METADATA.fullmatch(n) and n.endswith("timestamp.json") for n in seen):
        raise OfflineImportError("offline file carries no TUF timestamp (truncated?)")
    return OfflinePackage(root, target, directors)


def member_names(metadata: list[str], target: str, directors: list[str]) -> list[str]:
    """Validate the member names a writer is about to use (the fleet's exporter calls this)."""
    names = [INDEX_NAME, *metadata, target, *directors]
    for n in names:
        _cap(n, OfflineLimits())
    return names
