"""Signing keys for the TUF roles and the director, behind securesystemslib signer URIs.

Layout of a key directory::

    keys.json                      public part: per role, threshold + [{keyid, uri, public}]
    private/<role>/<keyid>.pem     PKCS#8 PEM private keys, mode 0600 (only for `file2:` URIs)

Signers are always loaded with `Signer.from_priv_key_uri(uri, public_key)`, so an entry whose
URI is `awskms:...`, `gcpkms:...` or `hsm:...` works the same way as a file key. Rotating a role
keeps the previous keys under `retired` so the next root can still be signed by the old root keys.
Private key material is never printed or logged.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Key, Signer

from fleet.errors import FleetMisuseError, SigningKeyError

ROLES = ("root", "targets", "snapshot", "timestamp", "director")
ONLINE_ROLES = ("snapshot", "timestamp", "director")
KEYS_FILE = "keys.json"


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (temp file, fsync, `os.replace`, fsync directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class KeyEntry:
    """One key: its id, the signer URI that reaches its private part, and its public key."""

    keyid: str
    uri: str
    public: Key

    def to_dict(self) -> dict[str, Any]:
        return {"keyid": self.keyid, "uri": self.uri, "public": self.public.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KeyEntry:
        return cls(keyid=d["keyid"], uri=d["uri"], public=Key.from_dict(d["keyid"], dict(d["public"])))


@dataclass
class RoleKeys:
    """The active keys of a role, its threshold, and keys retired by rotations."""

    threshold: int
    keys: list[KeyEntry] = field(default_factory=list)
    retired: list[KeyEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "keys": [k.to_dict() for k in self.keys],
            "retired": [k.to_dict() for k in self.retired],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoleKeys:
        return cls(
            threshold=int(d["threshold"]),
            keys=[KeyEntry.from_dict(k) for k in d["keys"]],
            retired=[KeyEntry.from_dict(k) for k in d.get("retired", [])],
        )


class KeyStore:
    """Key directory for all roles. Raises `SigningKeyError`/`FleetMisuseError` on misuse."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = Path(keys_dir)

    @property
    def exists(self) -> bool:
        return (self.keys_dir / KEYS_FILE).exists()

    def _load(self) -> dict[str, RoleKeys]:
        path = self.keys_dir / KEYS_FILE
        if not path.exists():
            raise FleetMisuseError(f"no key store at {self.keys_dir}: run `edgefleet keys init` first")
        raw = json.loads(path.read_text())
        return {role: RoleKeys.from_dict(d) for role, d in raw["roles"].items()}

    def _save(self, roles: dict[str, RoleKeys]) -> None:
        doc = {"schema_version": 1, "roles": {r: rk.to_dict() for r, rk in roles.items()}}
        atomic_write(self.keys_dir / KEYS_FILE, json.dumps(doc, indent=2, sort_keys=True).encode())

    def _generate(self, role: str) -> KeyEntry:
        signer = CryptoSigner.generate_ed25519()
        keyid = signer.public_key.keyid
        pem = signer.private_bytes
        path = (self.keys_dir / "private" / role / f"{keyid}.pem").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        atomic_write(path, pem, mode=0o600)
        return KeyEntry(keyid=keyid, uri=f"file2:{path}", public=signer.public_key)

    def init(self, root_keys: int = 3, root_threshold: int = 2, overwrite: bool = False) -> None:
        """Create keys for every role: root `root_threshold` of `root_keys`, one key for others.

        Raises `FleetMisuseError` (the key store exists without `overwrite`, bad threshold).
        """
        if self.exists and not overwrite:
            raise FleetMisuseError(f"key store {self.keys_dir} already exists (use overwrite)")
        if not 1 <= root_threshold <= root_keys:
            raise FleetMisuseError(f"root threshold {root_threshold} must be within 1..{root_keys}")
        roles: dict[str, RoleKeys] = {}
        for role in ROLES:
            count, threshold = (root_keys, root_threshold) if role == "root" else (1, 1)
            roles[role] = RoleKeys(threshold=threshold, keys=[self._generate(role) for _ in range(count)])
        self._save(roles)

    def add_external(self, role: str, uri: str, public: Key) -> None:
        """Register a key held elsewhere (KMS/HSM signer URI) as an extra active key of `role`."""
        roles = self._load()
        roles[self._check_role(role)].keys.append(KeyEntry(public.keyid, uri, public))
        self._save(roles)

    def roles(self) -> dict[str, RoleKeys]:
        """All roles with their public keys (no private material)."""
        return self._load()

    def role(self, role: str) -> RoleKeys:
        return self._load()[self._check_role(role)]

    def rotate(self, role: str, count: int | None = None, threshold: int | None = None) -> RoleKeys:
        """Replace `role`'s keys by `count` new ones (default: same count); old keys are retired.

        Raises `FleetMisuseError` (unknown role, bad threshold, key store not initialised).
        """
        roles = self._load()
        current = roles[self._check_role(role)]
        count = count or len(current.keys)
        threshold = threshold or min(current.threshold, count)
        if not 1 <= threshold <= count:
            raise FleetMisuseError(f"threshold {threshold} must be within 1..{count}")
        new = RoleKeys(
            threshold=threshold,
            keys=[self._generate(role) for _ in range(count)],
            retired=[*current.retired, *current.keys],
        )
        roles[role] = new
        self._save(roles)
        return new

    def signers(self, role: str) -> list[Signer]:
        """Signers for the active keys of `role`."""
        return [self._load_signer(k) for k in self.role(role).keys]

    def signers_for(self, keyids: Iterable[str]) -> list[Signer]:
        """Signers for the given key ids (active or retired, any role) that this store can reach."""
        wanted = set(keyids)
        found: dict[str, KeyEntry] = {}
        for rk in self._load().values():
            for entry in [*rk.keys, *rk.retired]:
                if entry.keyid in wanted:
                    found[entry.keyid] = entry
        return [self._load_signer(e) for e in found.values()]

    @staticmethod
    def _load_signer(entry: KeyEntry) -> Signer:
        try:
            return Signer.from_priv_key_uri(entry.uri, entry.public)
        except (OSError, ValueError) as exc:
            raise SigningKeyError(
                f"cannot load signer for key {entry.keyid[:12]} ({entry.uri.split(':')[0]}): "
                f"{type(exc).__name__}"
            ) from None

    @staticmethod
    def _check_role(role: str) -> str:
        if role not in ROLES:
            raise FleetMisuseError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        return role
