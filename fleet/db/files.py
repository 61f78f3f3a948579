"""File modes of the fleet's state: the data directory 0700, databases and secret files 0600.

Why here and not left to the umask: `fleet.db` holds API key and token hashes, the broker
password hashes and the audit log, and a service started from a shell with umask 022 would
create it 0644 (world-readable, WAL included). So the modes are set explicitly, whatever the
umask, where the data directory and every database are created.

SQLite creates `-wal` and `-shm` files with the mode of their database file, so a database
made 0600 before SQLite opens it gets 0600 companions; companions left looser by an older
version are tightened here too. Errors: FleetMisuseError when a mode cannot be set (e.g. the
file belongs to another user).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from agent.logs import log_event
from fleet.errors import FleetMisuseError

logger = logging.getLogger("edgefleet.fleet.files")

DIR_MODE = 0o700
FILE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def secure_dir(path: Path | str) -> Path:
    """Create `path` (and missing parents) 0700, or tighten an existing looser one with a warning.

    Only for a directory the fleet owns (the data directory): never call it on a shared one
    such as `/tmp`.
    """
    path = Path(path)
    try:
        _make_parents(path)
        try:
            path.mkdir(mode=DIR_MODE)
            path.chmod(DIR_MODE)  # exactly 0700, whatever the umask took away
            return path
        except FileExistsError:
            pass
        _tighten(path, path.stat().st_mode, DIR_MODE, path.chmod)
    except OSError as exc:
        raise FleetMisuseError(f"cannot make {path} a private directory (0700): {exc}") from None
    return path


def secure_file(path: Path | str) -> Path:
    """Create `path` empty if absent and make it 0600 (tightening a looser one with a warning).

    A database is passed before SQLite opens it, so SQLite finds an empty file with the right
    mode (and creates its `-wal`/`-shm` files with the same mode); existing companions of a
    database are tightened as well. Missing parent directories are created 0700 (existing
    ones are left alone: they may be shared). `:memory:` and `""` (SQLite's in-memory and
    temporary databases) are returned untouched.
    """
    if str(path) in (":memory:", ""):
        return Path(str(path))
    path = Path(path)
    try:
        _make_parents(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            _tighten(path, os.fstat(fd).st_mode, FILE_MODE, lambda m: os.fchmod(fd, m))
        finally:
            os.close(fd)
        for suffix in SQLITE_COMPANIONS:
            companion = path.with_name(path.name + suffix)
            try:
                st = companion.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                _tighten(companion, st.st_mode, FILE_MODE, companion.chmod)
    except OSError as exc:
        raise FleetMisuseError(f"cannot make {path} a private file (0600): {exc}") from None
    return path


def is_private(path: Path | str) -> bool:
    """Whether no one but the owner may read or write `path` (for secrets the fleet only reads)."""
    return not stat.S_IMODE(Path(path).stat().st_mode) & 0o077


def _make_parents(path: Path) -> None:
    for parent in reversed([p for p in path.parents if not p.exists()]):
        parent.mkdir(mode=DIR_MODE, exist_ok=True)


def _tighten(path: Path, st_mode: int, wanted: int, chmod: Callable[[int], None]) -> None:
    """Set `wanted`; warn when the old mode let group or others in (a fresh file never does)."""
    mode = stat.S_IMODE(st_mode)
    if mode == wanted:
        return
    chmod(wanted)
    if mode & 0o077:
        log_event(logger, "fleet.files.tightened", logging.WARNING, path=str(path), was=oct(mode),
                  now=oct(wanted))
