"""The manifest of a published target, plain or sealed, for the fleet's own readers.

The drift monitor (reference profile) and the rollout compatibility check (tensors) read the
manifest of the bundle in the repository. A sealed target's manifest is inside the ciphertext,
so it is decrypted here with the fleet's content key (`data_dir/content-keys/`, beside
`data_dir/repo/`): only the first archive member, in memory, never written anywhere.

Errors: `read_published_manifest` raises what `read_manifest` raises (`BundleError`,
`BundleManifestError`, `MisuseError`), `BundleEncryptionError` for a sealed file that does
not open, and `MisuseError` when the fleet has no content key for it.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from agent.contract.bundle import read_manifest
from agent.contract.manifest import Manifest
from agent.contract.sealed import SealedReader, is_sealed
from agent.errors import MisuseError

CONTENT_KEYS = "content-keys"
_BLOCK = 512


def content_keys_dir(data_dir: Path) -> Path:
    """Where the fleet keeps sealed bundles' content keys (secrets, like `keys/`)."""
    return Path(data_dir) / CONTENT_KEYS


def read_published_manifest(repo_dir: Path, path: Path) -> Manifest:
    """The manifest of the repository file `path` (under `repo_dir`), decrypting a sealed one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise MisuseError(f"cannot open bundle {path}: {exc.strerror}") from None
    if not is_sealed(head):
        return read_manifest(path)
    sha = path.name.split(".", 1)[0]  # targets are stored as <sha256>.<name>
    try:
        key = (content_keys_dir(Path(repo_dir).parent) / f"{sha}.key").read_bytes()
    except OSError:
        raise MisuseError(f"no content key for the sealed target {path.name}") from None
    with open(path, "rb") as f:
        reader = SealedReader(f, key)
        header = reader.read(_BLOCK)
        try:
            size = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").size
        except tarfile.TarError:
            return read_manifest(header)  # reports the malformed archive in its own words
        body = reader.read(min(size, 8 << 20) + _BLOCK)
    return read_manifest(header + body)
