"""What `edgefleet demo` and `edgefleet sim run` show while they work, and where their logs go.

A suite runs for minutes and its components log hundreds of lines (fleet, publisher, controller,
swarm workers); on a terminal that buries what a person wants to see: which scenario runs, what
it is doing, how many devices are done. So the logs go to a file named on start
(`log_to_file`), and the terminal gets either a live view (`LiveView`: scenarios done, the
current scenario and stage, a devices done/total bar) or, when it is not a terminal (CI, a
pipe), a few plain lines (`PlainView`: one per scenario started and finished). The summary
table and the report paths are printed by the caller either way.

Scenarios report through `ScenarioContext.progress(stage, done, total)`; the views are
thread-safe (the scenario's sampler threads report too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from agent.logs import configure_logging
from simulators.scenarios import Verdict

#: Swarm worker processes (spawned, so they configure their own logging) append here when set.
SWARM_LOG_FILE_ENV = "EDGEFLEET_SWARM_LOG_FILE"


class SuiteView(Protocol):
    """What a suite run tells the person watching it."""

    def note(self, text: str) -> None: ...
    def scenario(self, index: int, total: int, name: str, devices: int) -> None: ...
    def stage(self, text: str, done: int | None = None, total: int | None = None) -> None: ...
    def result(self, verdict: Verdict, line: str) -> None: ...
    def close(self) -> None: ...


class PlainView:
    """Non-terminal output: a line per note, per scenario start and per result; stages are not shown."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def note(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def scenario(self, index: int, total: int, name: str, devices: int) -> None:
        self.console.print(f"[{index}/{total}] {name} ({devices} devices) ...", soft_wrap=True)

    def stage(self, text: str, done: int | None = None, total: int | None = None) -> None:
        return None

    def result(self, verdict: Verdict, line: str) -> None:
        self.console.print(line, soft_wrap=True)

    def close(self) -> None:
        return None


class LiveView:
    """A rich live view: scenarios done/total, the current scenario's stage and devices done/total."""

    def __init__(self, console: Console, scenarios: int) -> None:
        self.console = console
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False, refresh_per_second=4,
        )
        self._suite: TaskID = self._progress.add_task("scenarios", total=scenarios)
        self._devices: TaskID = self._progress.add_task("starting", total=None, visible=False)
        self._name = ""
        self._progress.start()

    def note(self, text: str) -> None:
        self._progress.console.print(text)

    def scenario(self, index: int, total: int, name: str, devices: int) -> None:
        with self._lock:
            self._name = name
            self._progress.update(self._suite, description=f"scenario {index}/{total}: {name}")
            self._progress.reset(self._devices, total=devices, completed=0, visible=True,
                                 description=f"  {name}: starting")

    def stage(self, text: str, done: int | None = None, total: int | None = None) -> None:
        with self._lock:
            fields: dict[str, object] = {"description": f"  {self._name}: {text}"}
            if total is not None:
                fields["total"] = total
            if done is not None:
                fields["completed"] = done
            self._progress.update(self._devices, **fields)  # type: ignore[arg-type]
            self._progress.refresh()  # each report is seen, not only the one a 4 Hz refresh catches

    def result(self, verdict: Verdict, line: str) -> None:
        with self._lock:
            self._progress.console.print(line)
            self._progress.advance(self._suite)

    def close(self) -> None:
        with self._lock:
            self._progress.update(self._devices, visible=False)
            self._progress.stop()


def make_view(console: Console, scenarios: int) -> SuiteView:
    """The live view on a terminal, the plain one elsewhere (CI, pipes, files)."""
    return LiveView(console, scenarios) if console.is_terminal else PlainView(console)


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[Path]:
    """Send the root logger's edgefleet output (and the swarm workers') to `path` meanwhile.

    The level stays what `--log-level` set; the stderr handler is put back afterwards.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    saved = [h for h in root.handlers if getattr(h, "_edgefleet", False)]
    saved_level = root.level
    level = logging.getLevelName(root.level) if saved else "INFO"
    json_lines = any(getattr(h.formatter, "json_lines", False) for h in saved)
    previous_env = os.environ.get(SWARM_LOG_FILE_ENV)
    configure_logging(level=str(level), json_lines=json_lines, path=path)
    os.environ[SWARM_LOG_FILE_ENV] = str(path)
    try:
        yield path
    finally:
        for handler in [h for h in root.handlers if getattr(h, "_edgefleet", False)]:
            root.removeHandler(handler)
            handler.close()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(saved_level)
        if previous_env is None:
            os.environ.pop(SWARM_LOG_FILE_ENV, None)
        else:
            os.environ[SWARM_LOG_FILE_ENV] = previous_env
