"""The scenario framework: a registry of named scenarios, the context they run in, their verdicts.

Why functions over a context: a scenario is a script (set up, drive the swarm, inject faults,
check the fleet's state), and keeping it a plain function over a `ScenarioContext` lets the
CLI, the demo, the tests and the benchmark run the same code against the same broker.
A scenario only enters `REGISTRY` when every component it drives exists: a missing
component means no scenario, never a pass.

Errors: `get_scenarios` raises `fleet.errors.FleetMisuseError` for an unknown name.
A scenario that raises is recorded as failed with the error as its details.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.logs import log_event
from fleet.errors import FleetMisuseError

logger = logging.getLogger(__name__)

Series = dict[str, list[tuple[float, float]]]  # name -> [(t_seconds, value), ...]


@dataclass
class Verdict:
    """What one scenario concluded, with the figures and time series the report plots."""

    name: str
    passed: bool
    details: str
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)  # plot title -> series
    elapsed_s: float = 0.0
    x_labels: dict[str, str] = field(default_factory=dict)  # plot title -> x axis (default: seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "details": self.details,
            "metrics": self.metrics,
            "elapsed_s": round(self.elapsed_s, 3),
            "series": {
                title: {k: [[round(t, 3), v] for t, v in pts] for k, pts in s.items()}
                for title, s in self.series.items()
            },
        }


class Recorder:
    """Collects time series while a scenario runs (t measured from the recorder's start)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._t0 = clock()
        self.series: dict[str, Series] = {}

    def point(self, plot: str, series: str, value: float) -> None:
        self.series.setdefault(plot, {}).setdefault(series, []).append((self._clock() - self._t0, value))

    def point_at(self, plot: str, series: str, t: float, value: float) -> None:
        """A point at an explicit time `t` (seconds on the scenario's own axis)."""
        self.series.setdefault(plot, {}).setdefault(series, []).append((t, value))

    def take(self) -> dict[str, Series]:
        out, self.series = self.series, {}
        self._t0 = self._clock()
        return out


def no_progress(stage: str, done: int | None = None, total: int | None = None) -> None:
    """The default progress sink: a scenario run without a view (tests, benchmarks)."""


ProgressFn = Callable[[str, "int | None", "int | None"], None]


@dataclass
class ScenarioContext:
    """Everything a scenario may use: the broker, a data directory, the clock, a recorder.

    `fleet` and `swarm` are handles the environment built (or None when the scenario builds
    its own); `devices` is the swarm size asked for on the command line. `progress(stage, done,
    total)` tells the person watching what the scenario does and how many devices are done
    (`simulators.progress` shows it; the default drops it).
    """

    broker_host: str
    broker_port: int
    data_dir: Path
    devices: int = 20
    processes: int = 1
    clock: Callable[[], float] = time.monotonic
    recorder: Recorder = field(default_factory=Recorder)
    fleet: Any = None
    swarm: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: ProgressFn = no_progress

    @property
    def broker_url(self) -> str:
        return f"mqtt://{self.broker_host}:{self.broker_port}"


ScenarioFn = Callable[[ScenarioContext], Verdict]


@dataclass(frozen=True)
class Scenario:
    """A registered scenario: its plan number, name, one-line description and function."""

    number: int
    name: str
    description: str
    run: ScenarioFn


REGISTRY: dict[str, Scenario] = {}
# The plan's scenarios whose components do not exist yet, with what is missing (shown by
# `edgefleet sim list` so nobody mistakes an absent scenario for a passing one).
NOT_AVAILABLE: dict[str, str] = {}


def register(number: int, name: str, description: str) -> Callable[[ScenarioFn], ScenarioFn]:
    """Decorator adding a scenario function to `REGISTRY`."""

    def deco(fn: ScenarioFn) -> ScenarioFn:
        REGISTRY[name] = Scenario(number, name, description, fn)
        return fn

    return deco


_SCENARIO_MODULES: tuple[str, ...] = (
    "simulators.scenario_rollout",
    "simulators.scenario_install",
    "simulators.scenario_drift",
    "simulators.scenario_faults",
    "simulators.scenario_security",
    "simulators.scenario_ab",
    "simulators.scenario_hostile",
    "simulators.scenario_retrain",
)


def _load_all() -> None:
    # Scenario modules register themselves on import; imported lazily so that `sim list`
    # and `--help` stay fast.
    for module in _SCENARIO_MODULES:
        importlib.import_module(module)


def get_scenarios(names: list[str] | None = None, max_number: int | None = None) -> list[Scenario]:
    """The scenarios to run, in plan order. Raises FleetMisuseError for an unknown name."""
    _load_all()
    if names:
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            known = ", ".join(sorted(REGISTRY))
            raise FleetMisuseError(f"unknown scenario(s) {', '.join(unknown)}; known: {known}")
        chosen = [REGISTRY[n] for n in names]
    else:
        chosen = list(REGISTRY.values())
        if max_number is not None:
            chosen = [s for s in chosen if s.number <= max_number]
    return sorted(chosen, key=lambda s: s.number)


def run_scenario(scenario: Scenario, ctx: ScenarioContext) -> Verdict:
    """Run one scenario; an exception becomes a failed verdict carrying the traceback's last line."""
    started = time.monotonic()
    ctx.recorder.take()
    log_event(logger, "scenario.start", scenario=scenario.name)
    try:
        verdict = scenario.run(ctx)
    except Exception as exc:
        logger.debug("scenario %s raised\n%s", scenario.name, traceback.format_exc())
        verdict = Verdict(scenario.name, False, f"raised {type(exc).__name__}: {exc}")
    verdict.elapsed_s = time.monotonic() - started
    recorded = ctx.recorder.take()
    for title, series in recorded.items():
        verdict.series.setdefault(title, series)
    log_event(
        logger, "scenario.end", scenario=scenario.name, passed=verdict.passed, elapsed_s=verdict.elapsed_s
    )
    return verdict
