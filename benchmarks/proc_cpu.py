"""CPU seconds of process groups over a measured window, read from /proc (Linux).

Why: on a machine whose cores are shared by the sender, the broker, PostgreSQL and the workers,
a throughput figure alone cannot say whether a second worker had a core to run on. Summing each
group's utime+stime over the window (`CpuMeter`) says how many cores the run kept busy and what
one report costs each component. No psutil (not a dependency): `/proc/<pid>/stat` and
`/proc/<pid>/cmdline` are enough.

A process can exit during the window (a PostgreSQL backend whose connection closed): the meter
keeps the last figure it read of every process, so sample often enough (`sample()` is cheap)
and a vanished process still counts what it used up to its last sample.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# a backend's title: "postgres: <user> <database> <host>(<port>) <state>" (or "[local]")
_BACKEND = re.compile(r"^postgres: (?:[^ ]+: )?\S+ (\S+) (?:\[local\]|[0-9a-fA-F.:]+\(\d+\))")


def parse_stat(text: str, ticks: int = CLOCK_TICKS) -> tuple[str, float]:
    """(command name, utime + stime in seconds) of one `/proc/<pid>/stat` line.

    The name is in parentheses and may itself hold spaces and parentheses, so the fields are
    counted from the *last* ')'. Raises ValueError on a line that is not a stat line."""
    open_at, close_at = text.find("("), text.rfind(")")
    if open_at < 0 or close_at < open_at:
        raise ValueError(f"not a /proc stat line: {text[:80]!r}")
    fields = text[close_at + 1:].split()
    if len(fields) < 13:
        raise ValueError(f"short /proc stat line: {text[:80]!r}")
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), from the state (3)
    return text[open_at + 1:close_at], (utime + stime) / ticks


def read_cpu_s(pid: int, proc: Path = PROC) -> float | None:
    """CPU seconds `pid` has used so far, or None when it is gone (or unreadable)."""
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())[1]
    except (OSError, ValueError):
        return None


def postgres_member(cmdline: str, database: str) -> bool:
    """Whether a PostgreSQL process belongs to a run on `database`: its backends (and autovacuum
    workers) on that database, and the server's own processes (postmaster, checkpointer, WAL
    writer, ...), which work for every database; backends of other databases do not."""
    title = cmdline.replace("\0", " ").strip()
    backend = _BACKEND.match(title)
    if backend is not None:
        return backend.group(1) == database
    if title.startswith("postgres: ") and "autovacuum worker" in title:
        return title.split()[-1] == database
    return True


def postgres_pids(database: str, proc: Path = PROC) -> list[int]:
    """Pids of the PostgreSQL processes `postgres_member` counts for `database`."""
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            cmdline = (entry / "cmdline").read_text()
        except OSError:
            continue  # gone meanwhile
        if postgres_member(cmdline, database):
            out.append(int(entry.name))
    return out


def window_cpu_s(first: dict[int, float], last: dict[int, float]) -> float:
    """CPU seconds used between two readings of a group: a process seen only in `last` began
    inside the window (all of its time counts), one that vanished keeps its last reading."""
    return sum(max(0.0, t - first.get(pid, 0.0)) for pid, t in last.items())


@dataclass
class CpuMeter:
    """Groups of processes (name -> a function listing their pids now); `start()` takes the first
    reading, `sample()` the latest one (call it during the window and at its end)."""

    groups: Mapping[str, Callable[[], Iterable[int]]]
    proc: Path = PROC
    _first: dict[str, dict[int, float]] = field(default_factory=dict)
    _last: dict[str, dict[int, float]] = field(default_factory=dict)

    def _read(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            now = {}
            for pid in pids():
                cpu = read_cpu_s(pid, self.proc)
                if cpu is not None:
                    now[pid] = cpu
            out[name] = now
        return out

    def start(self) -> None:
        self._first = self._read()
        self._last = {name: dict(v) for name, v in self._first.items()}

    def sample(self) -> None:
        for name, now in self._read().items():
            self._last.setdefault(name, {}).update(now)  # vanished pids keep their last reading

    def seconds(self) -> dict[str, float]:
        """CPU seconds per group between `start()` and the latest `sample()`."""
        return {name: window_cpu_s(self._first.get(name, {}), last) for name, last in self._last.items()}
