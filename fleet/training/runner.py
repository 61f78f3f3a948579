"""Run a trainer (or a labeler) in a subprocess: timeout, cancel, bounded logs, progress.

The child gets its own process group (killed whole on timeout or cancel, so a trainer's own
workers go too), a working directory of the job's, and stdin closed. Its stdout and stderr are
read line by line (each cut at `MAX_LINE` characters) and handed to `on_line`, which keeps at
most the policy's `max_log_lines` of them; `progress:` lines also go to `on_progress`.

Errors: `run_step` raises `TrainingFailed` (a `FleetInputError`: exited non-zero, timed out,
could not start) or `TrainingCancelled`; the last log lines are in the message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import FleetInputError
from fleet.training.interface import parse_progress

MAX_LINE = 2000
POLL_S = 0.1


class TrainingFailed(FleetInputError):
    """The user's trainer or labeler failed (exit status, timeout, bad output)."""


class TrainingCancelled(FleetInputError):
    """An operator cancelled the job while its step ran."""


@dataclass(frozen=True)
class StepResult:
    returncode: int
    seconds: float
    tail: tuple[str, ...]


def harness_argv(*args: str) -> list[str]:
    """`python -m fleet.training.harness ARGS` with this interpreter."""
    return [sys.executable, "-m", "fleet.training.harness", *args]


def run_step(argv: Sequence[str], cwd: Path, timeout_s: float, on_line: Callable[[str], None],
             on_progress: Callable[[float, str], None] | None = None,
             cancelled: Callable[[], bool] = lambda: False, env: dict[str, str] | None = None,
             what: str = "trainer") -> StepResult:
    """Run `argv` to the end; raises `TrainingFailed` / `TrainingCancelled` (module docstring)."""
    tail: deque[str] = deque(maxlen=20)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
                                env=child_env(env))
    except OSError as exc:
        raise TrainingFailed(f"cannot start the {what} {argv[0]!r}: {exc.strerror or exc}") from None

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")[:MAX_LINE]
            tail.append(line)
            on_line(line)
            p = parse_progress(line)
            if p is not None and on_progress is not None:
                on_progress(*p)

    reader = threading.Thread(target=read, name="training-log", daemon=True)
    reader.start()
    why = ""
    while proc.poll() is None:
        if time.monotonic() - start > timeout_s:
            why = f"timed out after {timeout_s:.0f} s"
        elif cancelled():
            why = "cancelled"
        if why:
            _kill(proc)
            break
        time.sleep(POLL_S)
    proc.wait()
    reader.join(timeout=5)
    seconds = time.monotonic() - start
    last = " | ".join(list(tail)[-5:])
    if why == "cancelled":
        raise TrainingCancelled(f"the {what} was cancelled")
    if why:
        raise TrainingFailed(f"the {what} {why} (last output: {last or 'none'})")
    if proc.returncode != 0:
        raise TrainingFailed(f"the {what} exited with status {proc.returncode} "
                             f"(last output: {last or 'none'})")
    return StepResult(proc.returncode, seconds, tuple(tail))


def child_env(env: dict[str, str] | None) -> dict[str, str]:
    """The child's environment: `env` (else the fleet's), with relative `PYTHONPATH` entries made
    absolute (the child runs in the job's directory, where `.` means something else)."""
    out = dict(os.environ if env is None else env)
    if out.get("PYTHONPATH"):
        out["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) if p else p
                                            for p in out["PYTHONPATH"].split(os.pathsep))
    return out


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
