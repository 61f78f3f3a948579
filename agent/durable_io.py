"""Durable file-system writes: the one place where the agent makes bytes survive a power cut.

Why a seam: a SIGKILL leaves the page cache intact, a power cut does not. What survives a
power cut is only what was fsynced: a file's contents by an fsync of the file, a name in a
directory (a create, rename, replace or unlink) by an fsync of *that directory*. Getting this
right in every writer separately is how the gaps came about (a slot renamed into place without
an fsync of its parent, so the state record could name a slot that was not on disk). The
agent's durable writes go through these few functions instead, and
`tests/agent/lifecycle/test_lifecycle_power_cut.py` checks the result: it records every
`os.fsync` during an update, rebuilds the device's directory from only what those fsyncs made
durable, at every cut point, and requires the lifecycle to serve a verified model from it.

This module is deliberately tiny and imports nothing from the project (agent.contract, the
trust client and the lifecycle all use it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_fd(fd: int) -> None:
    """fsync one open file or directory (every function here goes through this one)."""
    os.fsync(fd)


def fsync_file(path: Path) -> None:
    """Make the current contents of the file at `path` durable (its name needs `fsync_dir`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the names in directory `path` durable (after a create, rename, replace or unlink)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace the file at `path` by `data` atomically and durably.

    Temp file in the same directory -> write -> fsync -> `os.replace` -> fsync of the
    directory: after a power cut the file holds either its old contents or `data`, never a
    mixture or nothing. `mode` sets the permission bits before the file gets its name (a
    secret is never readable under it). Raises `OSError`; the temp file is removed on failure.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fsync_fd(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (bottom-up), `root` itself last.

    For a directory built in place (an extracted bundle) before it is renamed into its final
    name: after the rename and an fsync of the parent, its whole contents are on disk.
    Symlinks are not followed.
    """
    root = Path(root)
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            file = Path(dirpath) / name
            if not file.is_symlink():
                fsync_file(file)
        fsync_dir(Path(dirpath))


def makedirs_durably(path: Path) -> None:
    """`mkdir -p path`, fsyncing the parent of every directory it creates."""
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)
