"""`edgefleet fleet export-offline`: one file carrying a signed update for devices without a network.

Why here: it is a delivery path beside the MQTT publisher, with the same signed artefacts: the
TUF metadata as published (every root version, so a device on an old root follows the
rotations; the current timestamp, snapshot and targets), the bundle as its content-addressed
target, and a fresh director document per device (or one for a cohort) from the fleet's
`DirectorSigner`, whose sequence is the same counter online documents use. Nothing is re-signed
for the file: it stays valid until its timestamp expires (1 day by default) or its director
documents do, whichever comes first. The format is `agent.contract.offline`.

Errors: `export_offline` raises `FleetInputError` (no addressee, unknown target, unreadable repo).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from tuf.api.metadata import Metadata, Snapshot, Timestamp

from agent.contract.director import TargetRef
from agent.contract.offline import INDEX_NAME, member_names
from agent.errors import EdgefleetError
from agent.logs import log_event
from fleet.errors import FleetInputError
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.repository import Repository

logger = logging.getLogger("edgefleet.fleet.offline")


@dataclass(frozen=True)
class OfflineExport:
    path: Path
    addressees: list[str]
    valid_until: datetime  # the earliest expiry among the file's timestamp and director documents


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info


def _roots(meta: Path) -> list[str]:
    return sorted((p.name for p in meta.glob("*.root.json")), key=lambda n: int(n.split(".", 1)[0]))


def _consistent_view(meta: Path) -> tuple[Timestamp, list[str], bytes]:
    """The timestamp (parsed and as bytes) with the root versions it was published under.

    A running `fleet serve` may publish meanwhile: versioned files are never overwritten, so
    only a root rotation between the two reads matters, and then the read is repeated.
    """
    for _ in range(5):
        roots = _roots(meta)
        raw = (meta / "timestamp.json").read_bytes()
        if _roots(meta) == roots:
            return Metadata[Timestamp].from_bytes(raw).signed, roots, raw
    raise FleetInputError("the repository's root keeps changing; try again")


def export_offline(repo: Repository, signer: DirectorSigner, target: TargetRef, out: Path,
                   devices: list[str] | None = None, cohort: str | None = None,
                   ttl: timedelta = timedelta(days=7), rollout_id: str | None = None) -> OfflineExport:
    """Write the offline file for `target` addressed to `devices` (or `cohort`) to `out`."""
    if not devices and cohort is None:
        raise FleetInputError("name at least one device or a cohort")
    meta = repo.metadata_dir
    ts, roots, timestamp = _consistent_view(meta)
    snap_v = ts.snapshot_meta.version
    snapshot = Metadata[Snapshot].from_file(str(meta / f"{snap_v}.snapshot.json")).signed
    targets_v = snapshot.meta["targets.json"].version
    metadata = [*roots, f"{snap_v}.snapshot.json", f"{targets_v}.targets.json"]
    dirname, _, basename = target.path.rpartition("/")
    target_member = f"targets/{dirname}/{target.sha256}.{basename}".replace("//", "/")
    bundle = repo.targets_dir / dirname / f"{target.sha256}.{basename}"
    if not bundle.is_file():
        raise FleetInputError(f"target {target.path} has no file in the repository")
    docs: dict[str, bytes] = {}
    try:
        for dev in devices or []:
            docs[f"director/device-{dev}.json"] = signer.issue(
                target, device_id=dev, ttl=ttl, rollout_id=rollout_id, reason="offline export")
        if cohort is not None:
            docs[f"director/cohort-{cohort}.json"] = signer.issue(
                target, cohort=cohort, ttl=ttl, rollout_id=rollout_id, reason="offline export")
        member_names([f"metadata/{m}" for m in (*metadata, "timestamp.json")], target_member, list(docs))
    except (EdgefleetError, ValueError) as exc:
        raise FleetInputError(f"cannot export: {exc}") from exc
    out = Path(out)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f, \
                tarfile.TarFile(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            index = json.dumps({"schema_version": 1, "target": target.path}).encode()
            tar.addfile(_member(INDEX_NAME, len(index)), io.BytesIO(index))
            tar.addfile(_member("metadata/timestamp.json", len(timestamp)), io.BytesIO(timestamp))
            for name in metadata:
                data = (meta / name).read_bytes()
                tar.addfile(_member(f"metadata/{name}", len(data)), io.BytesIO(data))
            for name, data in docs.items():
                tar.addfile(_member(name, len(data)), io.BytesIO(data))
            with open(bundle, "rb") as src:
                tar.addfile(_member(target_member, bundle.stat().st_size), src)
        Path(tmp_name).replace(out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    valid_until = min(ts.expires, signer.clock() + ttl)
    log_event(logger, "offline.exported", target=target.path, file=str(out), addressees=len(docs))
    return OfflineExport(out, sorted(docs), valid_until)
