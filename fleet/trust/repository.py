"""The fleet's TUF repository, written with python-tuf's Metadata API.

Hosting layout (plain HTTP on `metadata/` and `targets/` serves a python-tuf client)::

    metadata/{N}.root.json  {N}.targets.json  {N}.snapshot.json  timestamp.json  root.json
    targets/<dir>/<sha256>.<basename>          (consistent snapshots: content-addressed names)

Root is signed by a threshold of offline keys and carries the director's keys and threshold in
`x-edgefleet-director`; targets, snapshot and timestamp use online keys. Every file is written
atomically, and versioned files are never overwritten, so a client mid-update always finds a
consistent set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from securesystemslib.signer import Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.contract.director import ROOT_DIRECTOR_FIELD, DirectorTrust, TargetRef
from agent.logs import log_event
from fleet.errors import FleetInputError, FleetMisuseError
from fleet.trust.keys import KeyStore, atomic_write

logger = logging.getLogger("edgefleet.repository")
T = TypeVar("T", bound=Signed)
_TARGET_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid (timestamp short: it bounds a freeze attack)."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Repository:
    """A TUF repository in `repo_dir`, signed with keys from `keystore`.

    Raises `FleetMisuseError` (not initialised, keys missing) and `FleetInputError` (bad target).
    """

    def __init__(
        self,
        repo_dir: Path,
        keystore: KeyStore,
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.metadata_dir = self.repo_dir / "metadata"
        self.targets_dir = self.repo_dir / "targets"
        self.keystore = keystore
        self.expiry = expiry or ExpiryPolicy()
        self.clock = clock
        self._serializer = JSONSerializer(compact=False)

    # ---- reading -------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.metadata_dir / "timestamp.json").exists()

    def _latest_version(self, role: str) -> int:
        versions = [int(p.name.split(".", 1)[0]) for p in self.metadata_dir.glob(f"*.{role}.json")]
        if not versions:
            raise FleetMisuseError(
                f"repository {self.repo_dir} is not initialised: run `edgefleet repo init`"
            )
        return max(versions)

    def load(self, role: str) -> Metadata[Any]:
        """The latest published metadata of a top-level role.

        Raises `FleetMisuseError` when the repository is not initialised.
        """
        if role == Timestamp.type:
            path = self.metadata_dir / "timestamp.json"
            if not path.exists():
                raise FleetMisuseError(f"repository {self.repo_dir} is not initialised")
        else:
            path = self.metadata_dir / f"{self._latest_version(role)}.{role}.json"
        return Metadata.from_file(str(path))

    def root_bytes(self) -> bytes:
        """The latest root, as devices are bootstrapped with it."""
        return (self.metadata_dir / f"{self._latest_version(Root.type)}.root.json").read_bytes()

    # ---- writing -------------------------------------------------------------------------
    def _expires(self, delta: timedelta) -> datetime:
        return (self.clock() + delta).replace(microsecond=0)

    def _write(self, md: Metadata[Any], name: str) -> None:
        atomic_write(self.metadata_dir / name, md.to_bytes(self._serializer))

    def _sign(self, md: Metadata[Any], signers: Sequence[Signer]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _root_from_keystore(self, version: int) -> Root:
        roles = self.keystore.roles()
        root = Root(version=version, expires=self._expires(self.expiry.root), consistent_snapshot=True)
        for role in (Root.type, Targets.type, Snapshot.type, Timestamp.type):
            rk = roles[role]
            root.roles[role] = Role([], rk.threshold)
            for entry in rk.keys:
                root.add_key(entry.public, role)
        director = roles["director"]
        anchor = DirectorTrust(keys={e.keyid: e.public for e in director.keys}, threshold=director.threshold)
        root.unrecognized_fields[ROOT_DIRECTOR_FIELD] = anchor.to_dict()
        return root

    def init(self, root_threshold: int = 2, root_keys: int = 3) -> None:
        """Create version 1 of every role (and the key store, if it does not exist yet).

        Raises `FleetMisuseError` when already initialised.
        """
        if self.initialized:
            raise FleetMisuseError(f"repository {self.repo_dir} is already initialised")
        if not self.keystore.exists:
            self.keystore.init(root_keys=root_keys, root_threshold=root_threshold)
        root = Metadata(self._root_from_keystore(1))
        self._sign(root, self.keystore.signers(Root.type))
        self._write(root, "1.root.json")
        self._write(root, "root.json")
        targets = Metadata(Targets(version=1, expires=self._expires(self.expiry.targets)))
        self._sign(targets, self.keystore.signers(Targets.type))
        self._write(targets, "1.targets.json")
        self._publish_snapshot_and_timestamp(targets_version=1, snapshot_version=1)
        log_event(logger, "repo.initialised", repo=str(self.repo_dir))

    def _publish_snapshot_and_timestamp(self, targets_version: int, snapshot_version: int) -> None:
        snapshot = Metadata(Snapshot(version=snapshot_version, expires=self._expires(self.expiry.snapshot)))
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets_version)
        self._sign(snapshot, self.keystore.signers(Snapshot.type))
        self._write(snapshot, f"{snapshot_version}.snapshot.json")
        ts_version = self.load(Timestamp.type).signed.version + 1 if self.initialized else 1
        self._write_timestamp(ts_version, snapshot_version)

    def _write_timestamp(self, version: int, snapshot_version: int) -> None:
        ts = Metadata(Timestamp(version=version, expires=self._expires(self.expiry.timestamp)))
        ts.signed.snapshot_meta = MetaFile(version=snapshot_version)
        self._sign(ts, self.keystore.signers(Timestamp.type))
        self._write(ts, "timestamp.json")

    def _bump_targets(self, mutate: Callable[[Targets], object]) -> int:
        targets: Metadata[Targets] = self.load(Targets.type)
        mutate(targets.signed)
        targets.signed.version += 1
        targets.signed.expires = self._expires(self.expiry.targets)
        self._sign(targets, self.keystore.signers(Targets.type))
        self._write(targets, f"{targets.signed.version}.targets.json")
        snapshot_version = self.load(Snapshot.type).signed.version + 1
        self._publish_snapshot_and_timestamp(targets.signed.version, snapshot_version)
        return targets.signed.version

    def add_target(
        self, local_file: Path, target_path: str, custom: dict[str, Any] | None = None
    ) -> TargetRef:
        """Publish `local_file` as TUF target `target_path` (bumps targets, snapshot, timestamp).

        The file is copied to `targets/<dir>/<sha256>.<basename>`. Returns the reference a
        director document points at. Raises `FleetInputError` for a bad path or file.
        """
        local_file = Path(local_file)
        if not local_file.is_file():
            raise FleetInputError(f"no such file: {local_file}")
        if not _TARGET_PATH.match(target_path) or ".." in target_path.split("/"):
            raise FleetInputError(f"bad target path {target_path!r}: use a/b/c.ext with [A-Za-z0-9._-]")
        info = TargetFile.from_file(target_path, str(local_file), ["sha256"])
        if custom:
            info.unrecognized_fields["custom"] = dict(custom)
        digest = info.hashes["sha256"]
        dirname, _, basename = target_path.rpartition("/")
        dest = self.targets_dir / dirname / f"{digest}.{basename}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        _copy_durably(local_file, dest)
        version = self._bump_targets(lambda t: t.targets.__setitem__(target_path, info))
        log_event(
            logger, "repo.target_added", target=target_path, length=info.length, targets_version=version
        )
        return self.target_ref(target_path)

    def remove_target(self, target_path: str) -> None:
        """Stop listing `target_path` (its content-addressed file stays for in-flight clients).

        Raises `FleetInputError` when the target is not listed.
        """
        if target_path not in self.load(Targets.type).signed.targets:
            raise FleetInputError(f"target {target_path!r} is not in the repository")
        self._bump_targets(lambda t: t.targets.pop(target_path))

    def target_ref(self, target_path: str) -> TargetRef:
        """A `TargetRef` (path, length, sha256, name/version labels) for a published target.

        Raises `FleetInputError` when the target is not listed.
        """
        info = self.load(Targets.type).signed.targets.get(target_path)
        if info is None:
            raise FleetInputError(f"target {target_path!r} is not in the repository")
        custom = info.unrecognized_fields.get("custom") or {}
        return TargetRef(
            path=target_path,
            length=info.length,
            sha256=info.hashes["sha256"],
            name=str(custom.get("name", "")),
            version=str(custom.get("version", "")),
        )

    def refresh_timestamp(self) -> int:
        """Re-sign the timestamp with a fresh expiry (run well within `expiry.timestamp`)."""
        current = self.load(Timestamp.type).signed
        self._write_timestamp(current.version + 1, current.snapshot_meta.version)
        log_event(logger, "repo.timestamp_refreshed", version=current.version + 1)
        return current.version + 1

    def rotate_root(self) -> int:
        """Publish root N+1 with the key store's current keys (after `KeyStore.rotate`).

        Signed by the previous root's keys (meeting the old threshold) and the new root keys
        (meeting the new threshold), as clients require; then targets, snapshot and timestamp are
        re-signed in case their keys changed. Raises `SigningKeyError` if old keys are missing.
        """
        old: Metadata[Root] = self.load(Root.type)
        new = Metadata(self._root_from_keystore(old.signed.version + 1))
        old_role = old.signed.roles[Root.type]
        old_signers = self.keystore.signers_for(old_role.keyids)
        if len(old_signers) < old_role.threshold:
            raise FleetMisuseError(
                f"only {len(old_signers)} of the previous root's keys are reachable; "
                f"its threshold is {old_role.threshold}"
            )
        new_signers = self.keystore.signers(Root.type)
        by_id = {s.public_key.keyid: s for s in [*old_signers, *new_signers]}
        self._sign(new, list(by_id.values()))
        version = new.signed.version
        self._write(new, f"{version}.root.json")
        self._write(new, "root.json")
        self._bump_targets(lambda t: None)
        log_event(logger, "repo.root_rotated", version=version)
        return version

    def status(self) -> dict[str, Any]:
        """Versions, expiries and targets, for `edgefleet repo status`."""
        out: dict[str, Any] = {"repo": str(self.repo_dir), "roles": {}}
        for role in (Root.type, Targets.type, Snapshot.type, Timestamp.type):
            signed = self.load(role).signed
            out["roles"][role] = {"version": signed.version, "expires": signed.expires.isoformat()}
        targets = self.load(Targets.type).signed.targets
        out["targets"] = {
            path: {"length": t.length, "sha256": t.hashes.get("sha256", ""), **t.unrecognized_fields}
            for path, t in sorted(targets.items())
        }
        return out


def _copy_durably(src: Path, dest: Path) -> None:
    """Copy through a temp file, fsync, then rename: a client never sees a partial target."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    tmp.replace(dest)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dump_status(status: dict[str, Any]) -> str:
    """Human-readable JSON of `Repository.status()`."""
    return json.dumps(status, indent=2, sort_keys=True)
