"""Applying offline update files (`edgefleet agent import FILE`, or a watched drop directory).

An offline file is verified exactly as if it had come over MQTT: the agent's own `TrustClient`
(same trusted metadata directory, same target cache, same limits and clock) refreshes through a
`DirectoryFetcher` over the extracted file instead of the MQTT fetcher; its director documents go
through the daemon's `DirectorGate` (signature against the director keys in the trusted root,
per-addressee sequence, expiry, addressee); the lifecycle installs, checks golden vectors, runs
probation and commits or rolls back as always, with that trust client as its source for this
one update. Nothing of the file is used before it verified; on a refusal nothing changed (TUF
keeps only metadata that verified; the ledger, the record and the slots are untouched).

The outcome is remembered in `offline_install.json` so that the reported state says
`install_origin: offline_install` while that bundle is active, and an `offline_install` event
(or `offline_refused`, with the reason) waits in the on-disk outbox until the device reconnects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract.offline import OfflineLimits, OfflinePackage, read_offline
from agent.daemon.director_gate import DirectorGate
from agent.durable_io import write_durably
from agent.errors import DirectorError, EdgefleetError, MisuseError, OfflineImportError
from agent.lifecycle import Lifecycle
from agent.lifecycle.state_store import DesiredTarget
from agent.logs import log_event
from agent.trust import TrustClient

log = logging.getLogger("edgefleet.agent.offline")
MARKER = "offline_install.json"
LOCK_FILE = "agent.lock"
SUFFIX = ".efo"


@dataclass(frozen=True)
class ImportResult:
    bundle_id: str
    state: str


def lock_state_dir(state_dir: Path) -> int:
    """Take the agent's exclusive lock on `state_dir` (one writer of its record and slots).

    Returns the lock's file descriptor (released when closed or the process dies). Raises
    `MisuseError` when another process holds it.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise MisuseError(f"another agent process holds {state_dir / LOCK_FILE}") from None
    return fd


class OfflineImporter:
    """Verify and apply offline files against one device's trusted state and lifecycle."""

    def __init__(self, state_dir: Path, bootstrap_root: bytes, gate: DirectorGate, lifecycle: Lifecycle,
                 event: Callable[..., None], drop_dir: Path | None = None,
                 limits: OfflineLimits | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.bootstrap_root = bootstrap_root
        self.gate = gate
        self.lifecycle = lifecycle
        self.event = event
        self.drop_dir = drop_dir
        self.limits = limits or OfflineLimits()
        self._installed = self._load_marker()  # read once: every reported state asks

    def _load_marker(self) -> str | None:
        try:
            doc: Any = json.loads((self.state_dir / MARKER).read_bytes())
        except (OSError, ValueError):
            return None
        return str(doc["bundle"]) if isinstance(doc, dict) and isinstance(doc.get("bundle"), str) else None

    # -- what the fleet hears ------------------------------------------------------------------
    def origin_of(self, bundle_id: str | None) -> str:
        """`offline_install` when `bundle_id` is the bundle the last offline import committed."""
        return "offline_install" if bundle_id and bundle_id == self._installed else ""

    # -- importing -----------------------------------------------------------------------------
    def _trust(self, pkg: OfflinePackage) -> TrustClient:
        from agent.trust.fetchers import DirectoryFetcher  # lazy: python-tuf's client, ~12 MB RSS

        fetcher = DirectoryFetcher(pkg.root, prefix="file://offline/")
        return TrustClient(self.state_dir / "tuf" / "metadata", self.state_dir / "tuf" / "targets", fetcher,
                           fetcher.url_for("metadata"), fetcher.url_for("targets"),
                           bootstrap_root=self.bootstrap_root, clock=self.gate.clock)

    def _accept(self, pkg: OfflinePackage) -> DesiredTarget:
        """The first director document in the file that the gate accepts (refusals: the first one)."""
        refusals: list[DirectorError] = []
        for addressee, data in sorted(pkg.directors.items()):
            try:
                target = self.gate.accept(addressee, data, self.lifecycle.record.director_sequence)
            except DirectorError as exc:
                refusals.append(exc)
                continue
            if target is None:
                raise OfflineImportError("the offline file's director document was already applied")
            return target
        raise refusals[0]

    def import_file(self, path: Path) -> ImportResult:
        """Verify `path` and install what it directs; returns the bundle and the lifecycle state.

        Raises `OfflineImportError` (malformed, unsafe, truncated, or the install did not
        commit), `TrustError` (expired, foreign or tampered metadata or bundle), `DirectorError`
        (document for another device, replayed, expired, badly signed) and `MisuseError`.
        """
        pkg = read_offline(Path(path), self.state_dir / "offline-work", self.limits)
        try:
            trust = self._trust(pkg)
            trust.refresh()
            target = self._accept(pkg)
            trust.download_target(target.path, None)  # TUF-verified into the cache before any state moves
            ctx = self.lifecycle.ctx
            online, ctx.trust = ctx.trust, trust
            try:
                self.lifecycle.offer_desired(target)
                state = self.lifecycle.run_until_stable()
            finally:
                ctx.trust = online
        finally:
            pkg.cleanup()
        rec = self.lifecycle.record
        if rec.active != target.bundle_id:
            raise OfflineImportError(
                f"offline install of {target.bundle_id} did not commit: {rec.last_error or rec.state}")
        write_durably(self.state_dir / MARKER, json.dumps({"bundle": target.bundle_id}).encode())
        self._installed = target.bundle_id
        self.event("offline_install", bundle_id=target.bundle_id, previous_bundle_id=rec.previous,
                   reason=f"installed from offline file {Path(path).name}")
        log_event(log, "agent.offline_installed", bundle=target.bundle_id, file=str(path))
        return ImportResult(target.bundle_id, state.value)

    def poll_drop_dir(self) -> None:
        """Import every `*.efo` file in the drop directory, then move it to `processed/` or `refused/`."""
        if self.drop_dir is None or not self.drop_dir.is_dir():
            return
        for path in sorted(self.drop_dir.glob(f"*{SUFFIX}")):
            try:
                self.import_file(path)
                outcome = "processed"
            except EdgefleetError as exc:
                outcome = "refused"
                log_event(log, "agent.offline_refused", logging.WARNING, file=str(path), error=str(exc))
                self.event("offline_refused", reason=f"{path.name}: {type(exc).__name__}: {exc}")
                with contextlib.suppress(OSError):
                    (self.drop_dir / outcome).mkdir(exist_ok=True)
                    (self.drop_dir / outcome / f"{path.name}.reason").write_text(f"{exc}\n")
            with contextlib.suppress(OSError):
                (self.drop_dir / outcome).mkdir(exist_ok=True)
                shutil.move(str(path), self.drop_dir / outcome / path.name)
