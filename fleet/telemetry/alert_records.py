"""The alert manager's records and tables: what an alert is, what it observes, its schema.

Kept apart from fleet/telemetry/alerts.py (the manager) so that the records other modules
build (`Observation` from fleet/telemetry/health.py) do not pull in the manager. The tables
are declared in `fleet.db.schema` (ALERTS group, Alembic revisions alerts_0001 and
alerts_0002); they keep their first names (`drift_alerts`, `drift_episodes`) although they now
hold every kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleet.errors import FleetMisuseError
from fleet.telemetry.drift import DriftThresholds, Method

ALERTS_TABLE = "drift_alerts"  # every kind's alerts (the name predates the other kinds)
EPISODES_TABLE = "drift_episodes"
HEALTH_EPISODES_TABLE = "alert_episodes"  # episodes of the kinds beyond drift
CURSOR_TABLE = "drift_cursor"
ACKS_TABLE = "drift_alert_acks"
KINDS = ("drift", "retrain", "error_rate", "latency", "offline", "rollout_gate")


@dataclass(frozen=True)
class AlertConfig:
    """When to trigger retraining, when an episode ends, and where alerts go."""

    persist_windows: int = 3
    webhook_url: str | None = None
    command: tuple[str, ...] = ()
    webhook_timeout_s: float = 5.0
    command_timeout_s: float = 30.0
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    method: Method = "auto"
    clear_windows: int = 2  # consecutive clean observations that end an episode

    def __post_init__(self) -> None:
        if self.persist_windows < 1 or self.webhook_timeout_s <= 0 or self.command_timeout_s <= 0 \
                or self.clear_windows < 1:
            raise FleetMisuseError("alerts: persist_windows >= 1, clear_windows >= 1 and positive "
                                   "timeouts required")


@dataclass(frozen=True)
class Alert:
    """One alert or retraining trigger, as persisted and delivered (JSON body = these fields)."""

    kind: str  # one of KINDS
    model: str
    version: str
    cohort: str
    subject: str  # drift: feature, "output:<name>", "dataset" or "prediction"; else see module doc
    statistic: str
    value: float
    threshold: float
    window_start: float
    window_s: float
    windows: int
    devices: list[str]
    device_count: int
    created_at: float
    id: int | None = None
    episode: int | None = None  # id of the alert that opened the episode (itself when it did)
    escalation: int = 0  # 0: opened the episode; n: its n-th escalation
    features: list[str] = field(default_factory=list)  # what the episode names now (drifted features, ...)
    baseline: str = ""  # the version a regression was judged against
    detail: str = ""
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """One observation of a non-drift condition for `AlertManager.observe` (fleet/telemetry/health.py)."""

    kind: str
    subject: str
    firing: bool
    at: float
    model: str = ""
    version: str = ""
    cohort: str = ""
    statistic: str = ""
    value: float = math.nan
    threshold: float = math.nan
    members: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    baseline: str = ""
    detail: str = ""
    evidence: dict[str, float] = field(default_factory=dict)
    window_s: float = 0.0
    clear_after: int | None = None  # None: the config's clear_windows
