"""The device's TUF client: python-tuf's `Updater` with a pluggable fetcher and an injected clock.

Why a wrapper: the agent needs (a) a new `Updater` per update cycle (`refresh()` runs once per
instance), (b) the trust anchor read from the metadata directory (tuf 7 requires `bootstrap=`),
(c) tuf's exceptions split into *untrusted data* (`TrustError`) and *network* (`TransportError`),
(d) the director's trust anchor read from the verified root, and (e) a cross-check of a director
document's target reference against the TUF-signed length and hash.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from tuf.api import exceptions as tuf_exc

from agent.contract.director import DirectorTrust, TargetRef
from agent.durable_io import write_durably
from agent.errors import MisuseError, NotFoundError, TransportError, TrustError
from agent.logs import log_event

# python-tuf's metadata and client modules are imported where they are used: they load
# securesystemslib's signer and cryptography (~12 MB RSS with urllib3), which an idle agent
# does not need until its first update cycle (docs/agent.md, "Memory").
if TYPE_CHECKING:
    from tuf.api.metadata import Root, TargetFile
    from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

logger = logging.getLogger("edgefleet.trust")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class TrustLimits:
    """Upper bounds on downloaded metadata (python-tuf refuses anything longer: endless data)."""

    root_max_bytes: int = 512_000
    timestamp_max_bytes: int = 16_384
    snapshot_max_bytes: int = 2_000_000
    targets_max_bytes: int = 5_000_000
    max_root_rotations: int = 32

    def updater_config(self, prefix_targets_with_hash: bool = True) -> UpdaterConfig:
        """The python-tuf configuration these limits describe."""
        from tuf.ngclient import UpdaterConfig

        return UpdaterConfig(
            max_root_rotations=self.max_root_rotations,
            root_max_length=self.root_max_bytes,
            timestamp_max_length=self.timestamp_max_bytes,
            snapshot_max_length=self.snapshot_max_bytes,
            targets_max_length=self.targets_max_bytes,
            prefix_targets_with_hash=prefix_targets_with_hash,
            app_user_agent="edgefleet",
        )


def _raise_wrapped(exc: Exception, what: str) -> NoReturn:
    """Map a python-tuf/OS exception to the agent's hierarchy (untrusted vs transport)."""
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        raise TrustError(f"{what}: more data than signed (endless data attack?): {exc}") from exc
    if isinstance(exc, tuf_exc.DownloadHTTPError) and exc.status_code in (403, 404):
        raise NotFoundError(f"{what}: not found on the repository ({exc.status_code}): {exc}") from exc
    if isinstance(exc, tuf_exc.DownloadError):
        raise TransportError(f"{what}: download failed: {exc!r}") from exc
    if isinstance(exc, tuf_exc.RepositoryError):
        raise TrustError(f"{what}: {type(exc).__name__}: {exc}") from exc
    if isinstance(exc, OSError):
        raise MisuseError(f"{what}: local storage failed: {exc}") from exc
    raise TrustError(f"{what}: {type(exc).__name__}: {exc}") from exc


@functools.cache
def _durable_updater() -> type[Updater]:
    """python-tuf's `Updater`, with metadata writes that survive a power cut.

    python-tuf persists metadata atomically (temp file, `os.replace`) but never fsyncs it: after
    a power cut the trusted `root.json` can be an empty file under its name, every later refresh
    then fails with "loading the trusted root", and each update is refused as untrusted (and
    quarantined) forever. `write_durably` fsyncs the file before the rename and the directory
    after it (tests/agent/lifecycle/test_lifecycle_power_cut.py).
    """
    from tuf.ngclient import Updater

    class DurableUpdater(Updater):
        def _persist_file(self, filename: str, data: bytes) -> None:
            write_durably(Path(filename), data)

    return DurableUpdater


class TrustSession:
    """One refreshed `Updater`: download any number of targets against one metadata snapshot."""

    def __init__(self, updater: Updater, target_dir: Path) -> None:
        self._updater = updater
        self.target_dir = target_dir

    def target_info(self, target_path: str) -> TargetFile:
        """The TUF-signed info for `target_path`. Raises `TrustError` if it is not signed."""
        try:
            info = self._updater.get_targetinfo(target_path)
        except Exception as exc:
            _raise_wrapped(exc, f"looking up target {target_path!r}")
        if info is None:
            raise TrustError(f"target {target_path!r} is not listed in the signed targets metadata")
        return info

    def check_reference(self, target_path: str, expected: TargetRef | None) -> TargetFile:
        """The signed info of `target_path`; `expected` (if given) must equal its length and sha256.

        Raises `TrustError` when the target is unsigned or the reference disagrees with TUF.
        """
        info = self.target_info(target_path)
        if expected is not None:
            signed_sha = info.hashes.get("sha256")
            if (
                expected.path != target_path
                or expected.length != info.length
                or expected.sha256 != signed_sha
            ):
                raise TrustError(
                    f"director reference for {target_path!r} (length {expected.length}, "
                    f"sha256 {expected.sha256[:12]}) does not match the TUF-signed target "
                    f"(length {info.length}, sha256 {(signed_sha or '-')[:12]})"
                )
        return info

    def download_target(self, target_path: str, expected: TargetRef | None = None) -> Path:
        """Download (or reuse a cached copy of) a TUF-verified target; return its local path.

        If `expected` (a director document's reference) is given, its length and sha256 must
        equal the TUF-signed ones. Raises `TrustError` (unsigned, mismatch, tampered, too long),
        `TransportError`/`NotFoundError` (network), `MisuseError` (local storage).
        """
        info = self.check_reference(target_path, expected)
        cached = self._updater.find_cached_target(info)
        if cached is not None:
            log_event(logger, "trust.target_cached", target=target_path)
            return Path(cached)
        try:
            local = self._updater.download_target(info)
        except Exception as exc:
            _raise_wrapped(exc, f"downloading target {target_path!r}")
        log_event(logger, "trust.target_downloaded", target=target_path, length=info.length)
        return Path(local)


class TrustClient:
    """Trusted TUF state of one device: `metadata_dir` holds the trusted metadata.

    `bootstrap_root` is the root shipped with the device; it is only used when `metadata_dir`
    has no `root.json` yet (afterwards the stored root, updated by rotations, is the anchor).
    `fetcher` is a python-tuf fetcher, or a zero-argument factory of one called at the first
    update cycle (the daemon passes a factory so that an idle agent never loads python-tuf).
    """

    def __init__(
        self,
        metadata_dir: Path,
        target_dir: Path,
        fetcher: FetcherInterface | Callable[[], FetcherInterface],
        metadata_base_url: str,
        targets_base_url: str,
        bootstrap_root: bytes | None = None,
        clock: Clock = utc_now,
        limits: TrustLimits | None = None,
        prefix_targets_with_hash: bool = True,
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.target_dir = Path(target_dir)
        self.fetcher = fetcher
        self.metadata_base_url = metadata_base_url
        self.targets_base_url = targets_base_url
        self.bootstrap_root = bootstrap_root
        self.clock = clock
        self.limits = limits or TrustLimits()
        self.prefix_targets_with_hash = prefix_targets_with_hash

    def _anchor(self) -> bytes:
        stored = self.metadata_dir / "root.json"
        if stored.exists():
            return stored.read_bytes()
        if self.bootstrap_root is None:
            raise MisuseError(f"no trusted root: {stored} is missing and no bootstrap root was given")
        return self.bootstrap_root

    def _fetcher(self) -> FetcherInterface:
        from tuf.ngclient import FetcherInterface

        if not isinstance(self.fetcher, FetcherInterface):
            self.fetcher = self.fetcher()  # the factory runs once
        return self.fetcher

    def _updater(self) -> Updater:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.target_dir.mkdir(parents=True, exist_ok=True)
        try:
            updater = _durable_updater()(
                str(self.metadata_dir),
                self.metadata_base_url,
                str(self.target_dir),
                self.targets_base_url,
                fetcher=self._fetcher(),
                config=self.limits.updater_config(self.prefix_targets_with_hash),
                bootstrap=self._anchor(),
            )
        except Exception as exc:
            _raise_wrapped(exc, "loading the trusted root")
        # python-tuf takes its reference time at construction; the agent's clock decides instead
        # (the tuf-conformance reference client sets the same attribute).
        updater._trusted_set.reference_time = self.clock()
        return updater

    @contextmanager
    def session(self) -> Iterator[TrustSession]:
        """A refreshed session (new `Updater`). Raises as `refresh()` does."""
        updater = self._updater()
        try:
            updater.refresh()
        except Exception as exc:
            log_event(logger, "trust.refresh_failed", level=logging.WARNING, error=str(exc))
            _raise_wrapped(exc, "refreshing TUF metadata")
        yield TrustSession(updater, self.target_dir)

    def refresh(self) -> None:
        """Update root (rotations), timestamp, snapshot and targets per the TUF client workflow.

        Raises `TrustError` (bad signature, expired, rollback, mix-and-match, too long),
        `TransportError`/`NotFoundError` (network), `MisuseError` (no trusted root, storage).
        Trusted files in `metadata_dir` change only with metadata that verified.
        """
        with self.session():
            pass
        log_event(logger, "trust.refreshed", root_version=self.trusted_root().version)

    def download_target(self, target_path: str, expected: TargetRef | None = None) -> Path:
        """Refresh, then download a verified target (see `TrustSession.download_target`)."""
        with self.session() as session:
            return session.download_target(target_path, expected)

    def download_delta(self, delta: TargetRef, full: TargetRef) -> Path:
        """Refresh once, check `full` against TUF, then download the TUF-verified `delta` target.

        The full reference is checked in the same session so a delta is only ever used to
        rebuild a target this metadata signs. Raises as `TrustSession.download_target`.
        """
        with self.session() as session:
            session.check_reference(full.path, full)
            return session.download_target(delta.path, delta)

    def trusted_root(self) -> Root:
        """The currently trusted root (the anchor in `metadata_dir`, else the bootstrap root)."""
        from tuf.api.metadata import Metadata, Root

        try:
            md = Metadata[Root].from_bytes(self._anchor())
        except Exception as exc:
            raise TrustError(f"trusted root is unreadable: {exc}") from exc
        return md.signed

    def director_trust(self) -> DirectorTrust:
        """The director's keys and threshold from the trusted root. Raises `DirectorError`."""
        return DirectorTrust.from_root(self.trusted_root())

    def clear_targets(self) -> None:
        """Remove downloaded targets (the metadata stays trusted)."""
        shutil.rmtree(self.target_dir, ignore_errors=True)
