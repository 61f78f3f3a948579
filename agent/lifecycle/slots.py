"""On-disk bundle slots: `<state_dir>/bundles/<bundle_id>/`, pointers in the state record.

Why pointers in the record and not symlinks: the record is written atomically together
with the state it belongs to, so "which bundle is active" and "where the machine is"
can never disagree after a crash. A slot becomes visible only by an atomic rename of a
fully extracted, verified directory that carries a `slot.json` (the manifest and the
model file's relative path), so a half-extracted bundle is never mistaken for a good one.
Power cuts: the slot's files and directories are fsynced before the rename and its parent
after it (`agent.durable_io`), so a state record saved afterwards never names a slot that a
power cut can take back.
`gc()` keeps disk bounded: active, previous, one staged (plus the shadow, if any).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.contract.bundle_checks import MANIFEST_NAME
from agent.contract.manifest import Manifest, parse_manifest
from agent.durable_io import fsync_dir, fsync_tree, makedirs_durably, write_durably
from agent.errors import BundleError, MisuseError
from agent.lifecycle.state_store import StateRecord
from agent.logs import log_event

log = logging.getLogger(__name__)

BUNDLE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
SLOT_FILE = "slot.json"


class Extracted(Protocol):
    """What `agent.contract.bundle.extract_bundle` returns (only the fields used here)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def model_path(self) -> Path: ...


Extractor = Callable[[Path, Path], Extracted]


@dataclass(frozen=True)
class SlotBundle:
    """A verified, extracted bundle in its slot."""

    bundle_id: str
    root: Path
    manifest: Manifest
    model_path: Path


def check_bundle_id(bundle_id: str) -> str:
    """Raises `MisuseError` unless `bundle_id` is one safe path component."""
    if not BUNDLE_ID_RE.match(bundle_id) or ".." in bundle_id:
        raise MisuseError(f"not a valid bundle id: {bundle_id!r}")
    return bundle_id


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Slots:
    """The bundle directories under one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "bundles"
        self.downloads = Path(state_dir) / "downloads"
        makedirs_durably(self.root)
        makedirs_durably(self.downloads)

    def path(self, bundle_id: str) -> Path:
        return self.root / check_bundle_id(bundle_id)

    def has(self, bundle_id: str) -> bool:
        """True if the slot holds a complete, previously verified bundle."""
        return (self.path(bundle_id) / SLOT_FILE).is_file()

    def install(self, bundle_id: str, bundle_file: Path, extract: Extractor) -> SlotBundle:
        """Extract `bundle_file` into a temp dir, check it, and rename it into its slot.

        Raises `BundleError`/`ManifestError` (untrusted data) if the bundle is bad or is
        not the bundle the director named; the slot is left untouched in that case.
        """
        final = self.path(bundle_id)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{bundle_id}-", dir=self.root))
        try:
            content = tmp / "content"  # the extractor creates it (it must not exist yet)
            extracted = extract(Path(bundle_file), content)
            manifest = extracted.manifest
            if manifest.bundle_id != bundle_id:
                raise BundleError(f"bundle declares {manifest.bundle_id!r}, director named {bundle_id!r}")
            model_path = Path(extracted.model_path).resolve()
            if not model_path.is_relative_to(tmp.resolve()) or not model_path.is_file():
                raise BundleError(f"extracted model {model_path} is not inside the bundle")
            doc: dict[str, Any] = {
                "bundle_id": bundle_id,
                "model_path": str(model_path.relative_to(tmp.resolve())),
            }
            # The bundle's own manifest bytes (verified with the archive) are referenced, not
            # re-serialised: with golden vectors and a profile that was a third of an install.
            manifest_file = (content / MANIFEST_NAME).resolve()
            if manifest_file.is_relative_to(tmp.resolve()) and manifest_file.is_file():
                doc["manifest_path"] = str(manifest_file.relative_to(tmp.resolve()))
            else:  # an extractor that keeps no manifest file
                doc["manifest"] = json.loads(manifest.to_json())
            write_durably(tmp / SLOT_FILE, json.dumps(doc, sort_keys=True).encode())
            fsync_tree(tmp)  # whatever the extractor wrote, durable before the name is
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.root)  # the rename itself: without it a power cut can undo it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log_event(log, "lifecycle.slot_installed", bundle=bundle_id)
        return self.open(bundle_id)

    def open(self, bundle_id: str) -> SlotBundle:
        """Reopen an installed slot. Raises `BundleError` if it is missing or damaged."""
        root = self.path(bundle_id)
        try:
            doc: dict[str, Any] = json.loads((root / SLOT_FILE).read_text())
            if "manifest_path" in doc:
                manifest_file = (root / doc["manifest_path"]).resolve()
                if not manifest_file.is_relative_to(root.resolve()):
                    raise ValueError("manifest path outside the slot")
                manifest = parse_manifest(manifest_file.read_bytes())
            else:  # slots written before manifests were referenced
                manifest = parse_manifest(doc["manifest"])
            model_path = (root / doc["model_path"]).resolve()
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"slot {bundle_id!r} is missing or damaged: {exc}") from exc
        if not model_path.is_relative_to(root.resolve()) or not model_path.is_file():
            raise BundleError(f"slot {bundle_id!r}: model file missing")
        return SlotBundle(bundle_id, root, manifest, model_path)

    def verify_model(self, slot: SlotBundle) -> None:
        """Re-hash the model file against the manifest (catches on-disk corruption).

        Raises `BundleError` on a mismatch.
        """
        digest = "sha256:" + file_sha256(slot.model_path)
        if digest != slot.manifest.model_digest:
            raise BundleError(f"slot {slot.bundle_id!r}: model digest {digest} != manifest")

    def remove(self, bundle_id: str) -> None:
        shutil.rmtree(self.path(bundle_id), ignore_errors=True)

    def installed(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def gc(self, record: StateRecord) -> list[str]:
        """Delete every slot, temp dir and download the record does not point at.

        Keeps at most active, previous, staged (= candidate) and shadow. Returns removed ids.
        """
        pointers = (record.active, record.previous, record.staged, record.candidate, record.shadow)
        keep = {b for b in pointers if b}
        removed: list[str] = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-") or (entry.is_dir() and entry.name not in keep):
                shutil.rmtree(entry, ignore_errors=True)
                if not entry.name.startswith("."):
                    removed.append(entry.name)
        keep_download = Path(record.download_path).name if record.download_path else None
        for entry in self.downloads.iterdir():
            if entry.name != keep_download:
                with contextlib.suppress(OSError):
                    entry.unlink()
        if removed:
            log_event(log, "lifecycle.gc", removed=",".join(sorted(removed)))
        return sorted(removed)


def is_quarantined(record: StateRecord, bundle_id: str, sequence: int) -> bool:
    """A quarantined bundle is retried only when a *newer* director document names it."""
    seq = record.quarantined.get(bundle_id)
    return seq is not None and sequence <= seq


def quarantine(record: StateRecord, bundle_id: str) -> None:
    """Remember that `bundle_id` failed under the current director sequence."""
    record.quarantined[bundle_id] = max(record.director_sequence, record.quarantined.get(bundle_id, 0))
    # bounded: keep the 32 most recent quarantines
    if len(record.quarantined) > 32:
        for old in sorted(record.quarantined, key=record.quarantined.__getitem__)[:-32]:
            del record.quarantined[old]
