"""Record what each `os.fsync` made durable under a directory, and rebuild the tree a power
cut at any point would leave behind.

Why not SIGKILL: a killed process leaves the page cache behind, and the kernel writes it out
later, so every write survives. A power cut keeps only what was fsynced. The model here is
the weak POSIX one that `agent.durable_io` is written against:

- a file's *contents* are durable as of its last fsync (a file never fsynced is empty);
- a directory's *names* (creates, renames, replaces, unlinks in it) are durable as of the
  last fsync of that directory (a directory never fsynced is empty, or keeps its names from
  before the recording).

Files and directories are identified by inode (a rename keeps it), and every inode seen is
kept open (`O_PATH`) until the recording ends so that no number is reused meanwhile.

Two crash states are rebuilt per cut point `k` (after the k-th fsync):
- `"fsynced"`: only what fsyncs made durable (names and contents);
- `"names"`: every name as it was at that moment (the file system committed its metadata
  journal on its own) but contents only as fsynced: the state behind zero-length files after
  a rename whose data was never fsynced.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: name -> ("d", inode) | ("f", inode) | ("l", symlink target)
Listing = dict[str, tuple[str, int | str]]
MODES = ("fsynced", "names")


@dataclass
class Snapshot:
    """One fsync: which inode, what it held, and (for `"names"`) the whole tree at that moment."""

    ino: int
    listing: Listing | None  # a directory's names
    content: bytes | None  # a file's bytes
    tree: dict[int, Listing]  # every directory under the root: inode -> names (before the fsync)
    path: str


@dataclass
class Recorder:
    root: Path
    root_ino: int = 0
    initial_dirs: dict[int, Listing] = field(default_factory=dict)
    initial_files: dict[int, bytes] = field(default_factory=dict)
    snapshots: list[Snapshot] = field(default_factory=list)
    final_tree: dict[int, Listing] = field(default_factory=dict)
    _pins: dict[int, int] = field(default_factory=dict)

    # -- recording ----------------------------------------------------------------------------
    def _pin(self, ino: int, opener: str, dir_fd: int | None = None) -> None:
        if ino in self._pins:
            return
        with suppress(OSError):
            self._pins[ino] = os.open(opener, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)

    def _listing(self, dir_fd: int) -> Listing:
        names: Listing = {}
        for entry in os.scandir(dir_fd):
            if entry.is_symlink():
                names[entry.name] = ("l", os.readlink(entry.name, dir_fd=dir_fd))
                continue
            kind = "d" if entry.is_dir(follow_symlinks=False) else "f"
            names[entry.name] = (kind, entry.inode())
            self._pin(entry.inode(), entry.name, dir_fd)
        return names

    def _tree(self) -> dict[int, Listing]:
        tree: dict[int, Listing] = {}
        for dirpath, _dirs, _files in os.walk(self.root):
            fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
            try:
                tree[os.fstat(fd).st_ino] = self._listing(fd)
            finally:
                os.close(fd)
        return tree

    def start(self) -> None:
        self.root_ino = self.root.stat().st_ino
        self.initial_dirs = self._tree()
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                p = Path(dirpath) / name
                if not p.is_symlink():
                    self.initial_files[p.stat().st_ino] = p.read_bytes()

    def observe(self, fd: int) -> None:
        """Called for every `os.fsync(fd)` of the process while recording (after it returned)."""
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        if not (where == str(self.root) or where.startswith(str(self.root) + os.sep)):
            return
        st = os.fstat(fd)
        tree = self._tree()
        self._pin(st.st_ino, f"/proc/self/fd/{fd}")
        if stat.S_ISDIR(st.st_mode):
            snap = Snapshot(st.st_ino, self._listing(fd), None, tree, where)
        elif stat.S_ISREG(st.st_mode):
            with open(f"/proc/self/fd/{fd}", "rb") as fh:
                snap = Snapshot(st.st_ino, None, fh.read(), tree, where)
        else:
            return
        self.snapshots.append(snap)

    def stop(self) -> None:
        self.final_tree = self._tree()
        for fd in self._pins.values():
            os.close(fd)
        self._pins.clear()

    # -- replay -------------------------------------------------------------------------------
    def cuts(self) -> range:
        """Cut points: 0 = before the first fsync, k = right after the k-th."""
        return range(len(self.snapshots) + 1)

    def rebuild(self, k: int, mode: str, dest: Path) -> None:
        """Write the tree a power cut at cut point `k` leaves (see the module docstring) to `dest`."""
        done = self.snapshots[:k]
        contents = dict(self.initial_files)
        dirs = dict(self.initial_dirs)
        for snap in done:
            if snap.content is not None:
                contents[snap.ino] = snap.content
            elif snap.listing is not None:
                dirs[snap.ino] = snap.listing
        if mode == "names":
            # every name as at this moment: the tree when the next fsync was called (after the
            # last one: the tree when the recording ended)
            tree = self.snapshots[k].tree if k < len(self.snapshots) else self.final_tree
            dirs = {**dirs, **tree}
        elif mode != "fsynced":
            raise ValueError(mode)
        if dest.exists():
            shutil.rmtree(dest)
        self._write(self.root_ino, dest, dirs, contents, depth=0)

    def _write(
        self, ino: int, dest: Path, dirs: dict[int, Listing], contents: dict[int, bytes], depth: int
    ) -> None:
        dest.mkdir(parents=True)
        if depth > 32:  # a directory listed under two names in two snapshots: never loop
            return
        for name, (kind, ref) in dirs.get(ino, {}).items():
            target = dest / name
            if kind == "l":
                os.symlink(str(ref), target)
            elif kind == "d":
                self._write(int(ref), target, dirs, contents, depth + 1)
            else:
                target.write_bytes(contents.get(int(ref), b""))

    def durable_state(self, k: int) -> list[str]:
        """What the k-th fsync was about (for failure messages)."""
        return [f"{i + 1}: {'dir ' if s.listing is not None else 'file'} {s.path}"
                for i, s in enumerate(self.snapshots[:k])]


@contextmanager
def recording(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """Record every `os.fsync` under `root` while the block runs."""
    rec = Recorder(Path(root).resolve())
    rec.start()
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        rec.observe(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        yield rec
    finally:
        monkeypatch.setattr(os, "fsync", real)
        rec.stop()
