"""The health watch: alerts beyond drift, observed once per drift-monitor cycle.

Three conditions, each turned into `Observation`s for `AlertManager.observe`, which keeps
one episode per subject and sends one alert per episode (escalating when its members grow):

- **serving regressions** (`error_rate`, `latency`): per (model, cohort), the versions that
  served over the last `window_s` of closed windows (fleet/telemetry/serving.py); each
  candidate is judged against the cohort's baseline version (fleet/telemetry/alert_rules.py:
  `pick_baselines`, the sample floor, the error margin and z, the p95 ratio). Below the floor
  there is no observation at all, so a tiny sample neither opens nor ends an episode;
- **devices offline** (`offline`, subject `devices`): unrevoked devices the broker reports
  offline and not heard for `offline_after_s`; one episode for the fleet whose members are
  the devices, so a broker outage is one alert naming every device, and devices that follow
  escalate it; it ends once no device is offline for `clear_windows` cycles;
- **rollouts stopped by a gate** (`rollout_gate`, subject the rollout id): a rollout paused
  or rolling back with a gate breach the operator has not acknowledged (resumed); members are
  the breached stages, so a second stage's breach escalates. It ends when the rollout resumes
  or finishes (`clear_after=1`: nothing flaps there).

The rules are pure functions of the facts read here (`regression_observations`,
`offline_observation`, `gate_observations`) and the injected clock; this module only reads
(telemetry store, fleet store) and hands the observations to the manager, which does the
writing and delivery.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from agent.logs import log_event
from fleet.rollouts.records import RolloutRecords
from fleet.telemetry.alert_records import Alert, Observation
from fleet.telemetry.alert_rules import (
    DeviceSeen,
    RegressionRule,
    ServingSample,
    error_regression,
    latency_regression,
    offline_devices,
    pick_baselines,
)

if TYPE_CHECKING:
    from fleet.store import Store
    from fleet.telemetry.alerts import AlertManager
    from fleet.telemetry.ingest import TelemetryStore

log = logging.getLogger("edgefleet.fleet.health")

MAX_LISTED_DEVICES = 1000  # devices named in one offline alert (the count stays exact)
GATE_STATES = ("paused", "rolling_back")


@dataclass(frozen=True)
class HealthConfig:
    """Spans and thresholds of the health watch (`health_config` builds it from the settings)."""

    window_s: float = 900.0  # serving regressions: span of closed windows compared
    settle_s: float = 30.0  # a window is closed this long after it ends
    rule: RegressionRule = field(default_factory=RegressionRule)
    offline_after_s: float = 900.0  # 0: no offline alerts
    gate_alerts: bool = True


@dataclass(frozen=True)
class GateStop:
    """A rollout stopped by a gate: its id, model version, state and the breached stage."""

    rollout_id: str
    model_version: str
    state: str
    stage: int
    detail: str


# -- pure rules over facts ------------------------------------------------------------------------
def regression_observations(samples: Mapping[tuple[str, str], list[ServingSample]], rule: RegressionRule,
                            now: float, window_s: float) -> list[Observation]:
    """Observations of every candidate with enough evidence (none below the floor)."""
    out: list[Observation] = []
    for (model, cohort), versions in sorted(samples.items()):
        by_version = {s.version: s for s in versions}
        for candidate, baseline in sorted(pick_baselines(versions).items()):
            c, b = by_version[candidate], by_version[baseline]
            for kind, judged in (("error_rate", error_regression(c, b, rule)),
                                 ("latency", latency_regression(c, b, rule))):
                if judged is None:
                    continue
                out.append(Observation(
                    kind, kind, judged.firing, now, model, candidate, cohort, judged.statistic, judged.value,
                    judged.threshold, baseline=baseline, detail=judged.detail, evidence=judged.evidence,
                    window_s=window_s))
    return out


def offline_observation(devices: Iterable[DeviceSeen], now: float, offline_after_s: float) -> Observation:
    """The fleet's one `offline` observation: firing while any device is offline too long."""
    gone = offline_devices(devices, now, offline_after_s)
    listed = tuple(sorted(gone)[:MAX_LISTED_DEVICES])
    detail = f"{len(gone)} devices offline for more than {offline_after_s:.0f} s" if gone else ""
    return Observation("offline", "devices", bool(gone), now, statistic="offline_s",
                       value=max(gone.values(), default=0.0), threshold=offline_after_s,
                       members=tuple(sorted(gone)), devices=listed, detail=detail,
                       evidence={"devices_offline": float(len(gone))})


def gate_observations(stops: Iterable[GateStop], open_episodes: Iterable[tuple[str, str, str]], now: float
                      ) -> list[Observation]:
    """Firing for each rollout a gate stopped; not firing (ending it) for every open episode
    (rollout id, model, version: its key) whose rollout is no longer stopped."""
    out: list[Observation] = []
    seen: set[str] = set()
    for s in stops:
        seen.add(s.rollout_id)
        model, _, version = s.model_version.partition(":")
        action = "paused" if s.state == "paused" else "aborted"
        out.append(Observation(
            "rollout_gate", s.rollout_id, True, now, model, version, "", action, float(s.stage), math.nan,
            members=(f"stage {s.stage}",), detail=f"{action} by a gate: {s.detail}", clear_after=1))
    out += [Observation("rollout_gate", rid, False, now, model, version, clear_after=1)
            for rid, model, version in open_episodes if rid not in seen]
    return out


# -- reading the facts --------------------------------------------------------------------------------
def _ts(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def devices_seen(store: Store) -> list[DeviceSeen]:
    """Every unrevoked device: online flag and last time heard."""
    with store.read() as db:
        rows = db.execute(
            "SELECT id, online, last_seen FROM devices WHERE revoked = 0 ORDER BY id").fetchall()
    return [DeviceSeen(r[0], bool(r[1]), _ts(r[2])) for r in rows]


def gate_stops(store: Store, limit: int = 500) -> list[GateStop]:
    """Rollouts paused or rolling back with a gate breach the operator has not acknowledged."""
    records = RolloutRecords(store)
    out: list[GateStop] = []
    for state in GATE_STATES:
        for ro in store.rollouts.list(None, limit, state).items:
            rt = records.runtime(ro.id)
            if rt is None or rt.breach is None or rt.breach.acked:
                continue
            detail = "; ".join(str(i.get("message", i.get("gate", ""))) for i in rt.breach.items)
            out.append(GateStop(ro.id, ro.model_version_id, ro.state, rt.breach.stage, detail))
    return out


class HealthWatch:
    """Reads the facts, applies the rules, hands the observations to the alert manager.
    `store` may be None (no fleet database: only serving regressions)."""

    def __init__(self, telemetry: TelemetryStore, alerts: AlertManager, store: Store | None = None,
                 config: HealthConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        self.telemetry = telemetry
        self.alerts = alerts
        self.store = store
        self.config = config or HealthConfig()
        self.clock = clock

    def observations(self, now: float) -> list[Observation]:
        cfg = self.config
        until = now - cfg.settle_s - self.telemetry.config.window_s  # windows that started by then are closed
        samples = self.telemetry.serving_samples(until - cfg.window_s, until)
        out = regression_observations(samples, cfg.rule, now, cfg.window_s)
        if self.store is not None and cfg.offline_after_s > 0:
            out.append(offline_observation(devices_seen(self.store), now, cfg.offline_after_s))
        if self.store is not None and cfg.gate_alerts:
            open_ = [(e["subject"], e["model"], e["version"])
                     for e in self.alerts.open_episodes("rollout_gate")]
            out += gate_observations(gate_stops(self.store), open_, now)
        return out

    def run_once(self) -> list[Alert]:
        """One cycle: observe and alert; returns the alerts sent."""
        fired = self.alerts.observe(self.observations(self.clock()))
        if fired:
            log_event(log, "health.alerts", alerts=len(fired), kinds=sorted({a.kind for a in fired}))
        return fired
