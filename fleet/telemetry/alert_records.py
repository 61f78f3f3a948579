"""The alert manager's records and tables: what an alert is, what it observes, its schema.

Kept apart from fleet/telemetry/alerts.py (the manager) so that the records other modules
build (`Observation` from fleet/telemetry/health.py) do not pull in the manager; the schema is
one function (`ensure_schema`) so it can be ported as a whole. The tables keep their first
names (`drift_alerts`, `drift_episodes`) although they now hold every kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sqlite_utils

from fleet.errors import FleetMisuseError
from fleet.telemetry.drift import DriftThresholds, Method

ALERTS_TABLE = "drift_alerts"  # every kind's alerts (the name predates the other kinds)
EPISODES_TABLE = "drift_episodes"
HEALTH_EPISODES_TABLE = "alert_episodes"  # episodes of the kinds beyond drift
CURSOR_TABLE = "drift_cursor"
ACKS_TABLE = "drift_alert_acks"
KINDS = ("drift", "retrain", "error_rate", "latency", "offline", "rollout_gate")
_EPISODE_COLUMNS = {"clear_streak": int, "members": str, "escalations": int, "alert_id": int}
_ALERT_COLUMNS = {"episode": int, "escalation": int, "features": str, "baseline": str, "detail": str,
                  "evidence": str}


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


def _add_missing(db: sqlite_utils.Database, table: str, columns: dict[str, type]) -> None:
    have = {c.name for c in db.table(table).columns}
    for name, kind in columns.items():
        if name not in have:
            db.table(table).add_column(name, kind)


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Create this module's tables if missing and add the columns later versions need
    (idempotent; an alerts.db of an older fleet opens unchanged otherwise)."""
    if not db.table(ALERTS_TABLE).exists():
        db.table(ALERTS_TABLE).create(
            {"id": int, "kind": str, "model": str, "version": str, "cohort": str, "subject": str,
             "statistic": str, "value": float, "threshold": float, "window_start": float, "window_s": float,
             "windows": int, "devices": str, "device_count": int, "created_at": float,
             "delivered": int, "delivery_error": str},
            pk="id",
        )
    _add_missing(db, ALERTS_TABLE, _ALERT_COLUMNS)
    if not db.table(EPISODES_TABLE).exists():
        db.table(EPISODES_TABLE).create(
            {"model": str, "version": str, "cohort": str, "subject": str, "first_window": float,
             "last_window": float, "consecutive": int, "retrain_fired": int},
            pk=("model", "version", "cohort", "subject"),
        )
    _add_missing(db, EPISODES_TABLE, _EPISODE_COLUMNS)
    if not db.table(HEALTH_EPISODES_TABLE).exists():
        db.table(HEALTH_EPISODES_TABLE).create(
            {"kind": str, "model": str, "version": str, "cohort": str, "subject": str, "first_window": float,
             "last_window": float, "consecutive": int, **_EPISODE_COLUMNS},
            pk=("kind", "model", "version", "cohort", "subject"),
        )
    if not db.table(CURSOR_TABLE).exists():
        db.table(CURSOR_TABLE).create(
            {"model": str, "version": str, "cohort": str, "last_window": float},
            pk=("model", "version", "cohort"),
        )
    if not db.table(ACKS_TABLE).exists():  # beside the alerts: an alert row itself never changes
        db.table(ACKS_TABLE).create(
            {"alert_id": int, "acked_by": str, "acked_at": float, "note": str}, pk="alert_id",
        )
