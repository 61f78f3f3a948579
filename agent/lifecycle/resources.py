"""Resource-aware updates: hold an update while the device is short of disk, memory or CPU.

Why hold instead of fail: a device busy with its real work (a full queue, a batch job, a
log burst) is not a bad device, and an update forced through then either fails (and counts
against the rollout) or starves the model it serves. So before the download and before the
activation the lifecycle asks a `ResourceProbe` what is free and compares it with what the
step needs plus a margin (`ResourcePolicy`); short, it *holds*: it says why
(`held: low_memory (...)`, in the reported state and an `update_held` event), looks again
after a backoff, and carries on by itself once the resources are back.

What a step needs: the download, the bundle twice on disk (as `disk_shortfall` counts it)
plus the disk margin, and the memory margin (a disk too small to ever hold that is no reason
to wait: the download's own disk check fails the update with `disk full`, as it should); the
activation, the bundle manifest's `compatibility.min_memory_mb` plus the memory margin (the
new model loads beside the old one). The CPU check, when `max_load_per_cpu` is configured,
is the one-minute load average per CPU against it.

The probe is injected (`LifecycleContext.probe`): tests play a device low on memory without
exhausting the machine; `probe_system` is the real one (statvfs, /proc/meminfo, loadavg).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024


@dataclass(frozen=True)
class Resources:
    """What is free now (None: unknown on this platform, never a reason to hold)."""

    free_disk_bytes: int | None = None
    free_memory_mb: float | None = None
    load_per_cpu: float | None = None
    total_disk_bytes: int | None = None  # a step that needs more than the whole disk never holds


#: Reads the free resources for the state directory's disk.
ResourceProbe = Callable[[Path], Resources]


@dataclass(frozen=True)
class ResourcePolicy:
    """Margins a step keeps free beyond its own need, the CPU ceiling, and the hold backoff."""

    memory_margin_mb: float = 64.0
    disk_margin_mb: float = 16.0
    # Off unless configured: a load average says little about a device that runs its model at a
    # steady high load by design, and a ceiling tuned for one fleet is wrong for the next.
    max_load_per_cpu: float | None = None
    hold_base_s: float = 30.0  # the first look again; doubled per hold, capped
    hold_max_s: float = 600.0

    def backoff(self, holds: int) -> float:
        """Seconds until the `holds`-th look again (1-based)."""
        return min(self.hold_max_s, self.hold_base_s * 2 ** max(0, min(holds - 1, 32)))


def _meminfo_available_mb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def probe_system(path: Path) -> Resources:
    """The real probe: free disk of `path`, available memory, one-minute load per CPU."""
    disk: int | None = None
    total: int | None = None
    try:
        usage = shutil.disk_usage(path)
        disk, total = usage.free, usage.total
    except OSError:
        pass
    try:
        load: float | None = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = None
    return Resources(disk, _meminfo_available_mb(), load, total)


def shortfall(policy: ResourcePolicy, free: Resources, disk_bytes: int = 0,
              memory_mb: float = 0.0) -> str | None:
    """Why the step cannot run now (`low_disk ...`, `low_memory ...`, `high_cpu ...`), or None."""
    need_disk = disk_bytes + int(policy.disk_margin_mb * MB)
    fits_at_all = free.total_disk_bytes is None or need_disk <= free.total_disk_bytes
    if free.free_disk_bytes is not None and disk_bytes and free.free_disk_bytes < need_disk and fits_at_all:
        return f"low_disk ({free.free_disk_bytes // MB} MB free, {need_disk // MB} MB needed)"
    need_mem = memory_mb + policy.memory_margin_mb
    if free.free_memory_mb is not None and free.free_memory_mb < need_mem:
        return f"low_memory ({free.free_memory_mb:.0f} MB free, {need_mem:.0f} MB needed)"
    limit = policy.max_load_per_cpu
    if limit is not None and free.load_per_cpu is not None and free.load_per_cpu > limit:
        return f"high_cpu (load {free.load_per_cpu:.2f} per CPU, limit {limit:g})"
    return None
