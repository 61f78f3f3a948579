"""Drift alerts and retraining triggers, evaluated over merged telemetry windows.

Each window of a (model, version, cohort) is tested against the reference profile
(`fleet.telemetry.drift.report_drift`) once, in time order. Per subject (each input feature, each
output as `output:<name>`, plus `dataset` and `prediction`) an *episode* opens when the
subject drifts and closes at the first undrifted window; one `drift` alert is sent per
episode (not one per window), and one `retrain` trigger when the `dataset` or `prediction`
episode has lasted `persist_windows` consecutive windows. Windows with too few samples
leave episodes unchanged. Alerts are persisted (`fleet.db`: alerts.db, or PostgreSQL) before delivery
(webhook via httpx POST and/or a command fed the alert JSON on stdin); failed deliveries are
recorded and retried by `redeliver()`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry import TelemetryReport
from agent.logs import log_event
from fleet.db.database import Database
from fleet.db.session import Db
from fleet.errors import Conflict, FleetMisuseError, NotFound
from fleet.telemetry.drift import DriftReport, DriftThresholds, FeatureDrift, Method, report_drift

log = logging.getLogger("edgefleet.fleet.alerts")

ALERTS_TABLE = "drift_alerts"
EPISODES_TABLE = "drift_episodes"
CURSOR_TABLE = "drift_cursor"
ACKS_TABLE = "drift_alert_acks"


@dataclass(frozen=True)
class AlertConfig:
    """When to trigger retraining, and where alerts go (webhook URL and/or argv command)."""

    persist_windows: int = 3
    webhook_url: str | None = None
    command: tuple[str, ...] = ()
    webhook_timeout_s: float = 5.0
    command_timeout_s: float = 30.0
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    method: Method = "auto"

    def __post_init__(self) -> None:
        if self.persist_windows < 1 or self.webhook_timeout_s <= 0 or self.command_timeout_s <= 0:
            raise FleetMisuseError("alerts: persist_windows >= 1 and positive timeouts required")


@dataclass(frozen=True)
class Alert:
    """One drift alert or retraining trigger, as persisted and delivered."""

    kind: str  # "drift" | "retrain"
    model: str
    version: str
    cohort: str
    subject: str  # feature name, "output:<name>", "dataset" or "prediction"
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


def _subjects(d: DriftReport) -> list[tuple[str, FeatureDrift | None, bool]]:
    """(subject, deciding feature verdict or None, drifted) for every subject of a window;
    subjects without enough samples are left out."""
    out: list[tuple[str, FeatureDrift | None, bool]] = []
    for f in d.features:
        if f.method != "insufficient":
            out.append((f.name, f, f.drifted))
    for o in d.outputs:
        if o.method != "insufficient":
            out.append((f"output:{o.name}", o, o.drifted))
    if any(f.method != "insufficient" for f in d.features):
        out.append(("dataset", None, d.dataset_drift))
    if any(o.method != "insufficient" for o in d.outputs):
        out.append(("prediction", None, d.prediction_drift))
    return out


class AlertManager:
    """Evaluate windows, keep episode state and deliver alerts. `http` is an optional
    httpx client (tests and services pass their own). Raises `FleetMisuseError` when the
    database cannot be opened."""

    def __init__(
        self,
        location: str | Path,
        config: AlertConfig | None = None,
        clock: Callable[[], float] = time.time,
        http: httpx.Client | None = None,
    ) -> None:
        self.config = config or AlertConfig()
        self._clock = clock
        self._http = http
        self._lock = threading.RLock()  # evaluate/redeliver may run on different threads
        self.database = Database(location, "alerts", "alerts database")

    def close(self) -> None:
        self.database.close()

    def evaluate(
        self, model: str, version: str, cohort: str, profile: ReferenceProfile,
        windows: list[dict[str, Any]], window_s: float,
    ) -> list[Alert]:
        """Test each window not evaluated before (from `TelemetryStore.windows`, time order),
        update episodes, persist and deliver new alerts; returns them."""
        with self._lock:
            return self._evaluate(model, version, cohort, profile, windows, window_s)

    def _evaluate(
        self, model: str, version: str, cohort: str, profile: ReferenceProfile,
        windows: list[dict[str, Any]], window_s: float,
    ) -> list[Alert]:
        with self.database.read() as db:
            last = db.scalar(
                f"SELECT last_window FROM {CURSOR_TABLE} "  # noqa: S608
                "WHERE model = :model AND version = :version AND cohort = :cohort",
                {"model": model, "version": version, "cohort": cohort})
        last = float("-inf") if last is None else last
        fresh = [w for w in windows if w["window_start"] > last and w["cohort"] == cohort]
        alerts: list[Alert] = []
        for w in sorted(fresh, key=lambda x: x["window_start"]):
            report = w["report"]
            assert isinstance(report, TelemetryReport)
            verdict = report_drift(profile, report, self.config.thresholds, self.config.method)
            with self.database.tx() as db:
                alerts += self._advance(db, model, version, cohort, w, verdict, window_s)
                db.upsert(CURSOR_TABLE,
                          {"model": model, "version": version, "cohort": cohort,
                           "last_window": w["window_start"]},
                          key=("model", "version", "cohort"))
        for a in alerts:
            self._deliver(a)
        return alerts

    def _advance(
        self, db: Db, model: str, version: str, cohort: str, w: dict[str, Any], verdict: DriftReport,
        window_s: float,
    ) -> list[Alert]:
        fired: list[Alert] = []
        match = "model = :model AND version = :version AND cohort = :cohort AND subject = :subject"
        for subject, f, drifted in _subjects(verdict):
            key = (model, version, cohort, subject)
            names = {"model": model, "version": version, "cohort": cohort, "subject": subject}
            row = db.one(f"SELECT * FROM {EPISODES_TABLE} WHERE {match}", names)  # noqa: S608
            if not drifted:
                if row is not None:
                    db.execute(f"DELETE FROM {EPISODES_TABLE} WHERE {match}", names)  # noqa: S608
                    log_event(log, "drift.episode_closed", model=model, version=version, subject=subject)
                continue
            if row is None:
                row = {"model": model, "version": version, "cohort": cohort, "subject": subject,
                       "first_window": w["window_start"], "last_window": w["window_start"],
                       "consecutive": 0, "retrain_fired": 0}
                fired.append(self._alert("drift", key, f, verdict, w, window_s, 1))
            row["consecutive"] += 1
            row["last_window"] = w["window_start"]
            if (subject in ("dataset", "prediction") and not row["retrain_fired"]
                    and row["consecutive"] >= self.config.persist_windows):
                row["retrain_fired"] = 1
                fired.append(self._alert("retrain", key, f, verdict, w, window_s, row["consecutive"]))
            db.upsert(EPISODES_TABLE, row, key=("model", "version", "cohort", "subject"))
        for a in fired:
            rec = asdict(a)
            rec.pop("id")
            rec["devices"] = json.dumps(a.devices)
            rec.update(delivered=0, delivery_error="")
            object.__setattr__(a, "id", db.insert_id(ALERTS_TABLE, rec))
        return fired

    def _alert(
        self, kind: str, key: tuple[str, str, str, str], f: FeatureDrift | None, verdict: DriftReport,
        w: dict[str, Any], window_s: float, windows: int,
    ) -> Alert:
        model, version, cohort, subject = key
        if f is not None:
            statistic, value, threshold = f.method, f.statistic, f.threshold
        elif subject == "dataset":
            statistic, value = "drift_share", verdict.drifted_share
            threshold = self.config.thresholds.dataset_drift_share
        else:
            statistic, value, threshold = "outputs_drifted", sum(o.drifted for o in verdict.outputs), 1.0
        return Alert(kind, model, version, cohort, subject, statistic, float(value), float(threshold),
                     float(w["window_start"]), window_s, windows, list(w["devices"]), int(w["device_count"]),
                     self._clock())

    def _deliver(self, alert: Alert) -> bool:
        body = asdict(alert)
        errors: list[str] = []
        if self.config.webhook_url:
            try:
                client = self._http or httpx.Client(timeout=self.config.webhook_timeout_s)
                try:
                    timeout = self.config.webhook_timeout_s
                    resp = client.post(self.config.webhook_url, json=body, timeout=timeout)
                    if resp.status_code >= 300:
                        errors.append(f"webhook answered {resp.status_code}")
                finally:
                    if self._http is None:
                        client.close()
            except httpx.HTTPError as exc:
                errors.append(f"webhook: {type(exc).__name__}: {exc}")
        if self.config.command:
            try:
                done = subprocess.run(list(self.config.command), input=json.dumps(body), text=True,
                                      capture_output=True, timeout=self.config.command_timeout_s, check=False)
                if done.returncode != 0:
                    errors.append(f"command exited {done.returncode}: {done.stderr[-200:]}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"command: {type(exc).__name__}: {exc}")
        error = "; ".join(errors)
        assert alert.id is not None, "alerts are persisted before delivery"
        with self.database.tx() as db:
            db.execute(f"UPDATE {ALERTS_TABLE} SET delivered = :delivered, delivery_error = :error "  # noqa: S608
                       "WHERE id = :id", {"delivered": int(not errors), "error": error, "id": alert.id})
        log_event(log, f"drift.alert.{alert.kind}", subject=alert.subject, model=alert.model,
                  version=alert.version, cohort=alert.cohort, delivered=not errors, error=error)
        return not errors

    def redeliver(self) -> int:
        """Retry every undelivered alert; returns how many got through."""
        with self._lock:
            with self.database.read() as db:
                rows = db.query(f"SELECT * FROM {ALERTS_TABLE} WHERE delivered = 0 ORDER BY id")  # noqa: S608
            return sum(self._deliver(self._from_row(r)) for r in rows)

    def alerts(self, model: str | None = None, kind: str | None = None) -> list[Alert]:
        """Persisted alerts, oldest first, optionally filtered by model and kind."""
        where: list[str] = ["1 = 1"]
        args: dict[str, str] = {}
        if model is not None:
            where, args["model"] = [*where, "model = :model"], model
        if kind is not None:
            where, args["kind"] = [*where, "kind = :kind"], kind
        with self.database.read() as db:
            rows = db.query(f"SELECT * FROM {ALERTS_TABLE} WHERE {' AND '.join(where)} ORDER BY id",  # noqa: S608
                            args)
        return [self._from_row(r) for r in rows]

    @staticmethod
    def _from_row(r: dict[str, Any]) -> Alert:
        fields = {k: r[k] for k in Alert.__dataclass_fields__}
        fields["devices"] = json.loads(r["devices"])
        return Alert(**fields)

    def delivery_state(self, alert_id: int) -> tuple[bool, str]:
        with self.database.read() as db:
            row = db.one(f"SELECT delivered, delivery_error FROM {ALERTS_TABLE} WHERE id = :id",  # noqa: S608
                         {"id": alert_id})
        if row is None:
            raise NotFound(f"alert {alert_id} does not exist")
        return bool(row["delivered"]), str(row["delivery_error"])

    # -- listing and acknowledgement (the fleet API) -------------------------------------
    def page(
        self, before_id: int | None = None, limit: int = 50, model: str | None = None,
        version: str | None = None, cohort: str | None = None, kind: str | None = None,
        subject: str | None = None, acked: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Alerts newest first (keyset: ids below `before_id`), each with its delivery state
        and acknowledgement (`acked_by`/`acked_at`/`ack_note`, None when not acknowledged)."""
        where: list[str] = ["1 = 1"]
        args: dict[str, Any] = {"limit": max(1, int(limit))}
        for column, value in (("model", model), ("version", version), ("cohort", cohort),
                              ("kind", kind), ("subject", subject)):
            if value is not None:
                where, args[column] = [*where, f"a.{column} = :{column}"], value
        if acked is not None:
            where.append("k.alert_id IS NOT NULL" if acked else "k.alert_id IS NULL")
        if before_id is not None:
            where, args["before"] = [*where, "a.id < :before"], before_id
        sql = (f"SELECT a.*, k.acked_by, k.acked_at, k.note AS ack_note FROM {ALERTS_TABLE} a "  # noqa: S608
               f"LEFT JOIN {ACKS_TABLE} k ON k.alert_id = a.id WHERE {' AND '.join(where)} "
               "ORDER BY a.id DESC LIMIT :limit")
        with self._lock, self.database.read() as db:
            rows = db.query(sql, args)
        return [self._public(r) for r in rows]

    def get(self, alert_id: int) -> dict[str, Any]:
        """One alert as in `page`. Raises `NotFound`."""
        with self._lock, self.database.read() as db:
            rows = db.query(
                f"SELECT a.*, k.acked_by, k.acked_at, k.note AS ack_note FROM {ALERTS_TABLE} a "  # noqa: S608
                f"LEFT JOIN {ACKS_TABLE} k ON k.alert_id = a.id WHERE a.id = :id", {"id": alert_id})
        if not rows:
            raise NotFound(f"alert {alert_id} does not exist")
        return self._public(rows[0])

    def ack(self, alert_id: int, actor: str, note: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
        """Acknowledge an alert once; returns (before, after). Raises `NotFound`, and
        `Conflict` when it was already acknowledged."""
        with self._lock:
            before = self.get(alert_id)
            if before["acked_at"] is not None:
                raise Conflict(f"alert {alert_id} was already acknowledged by {before['acked_by']}")
            try:
                with self.database.tx() as db:
                    db.insert(ACKS_TABLE,
                              {"alert_id": alert_id, "acked_by": actor, "acked_at": self._clock(),
                               "note": note})
            except Conflict as exc:  # another fleet process acknowledged it in between
                raise Conflict(f"alert {alert_id} was already acknowledged") from exc
            after = self.get(alert_id)
        log_event(log, "drift.alert.acked", alert_id=alert_id, actor=actor)
        return before, after

    @staticmethod
    def _public(r: dict[str, Any]) -> dict[str, Any]:
        out = dict(r)
        out["devices"] = json.loads(out["devices"])
        out["delivered"] = bool(out["delivered"])
        return out

    def counts(self) -> list[dict[str, Any]]:
        """Alerts per (kind, model, version, cohort): `total`, `undelivered`, `unacked` (metrics)."""
        with self._lock, self.database.read() as db:
            return db.query(
                f"SELECT a.kind, a.model, a.version, a.cohort, count(*) AS total, "  # noqa: S608
                "sum(CASE WHEN a.delivered = 0 THEN 1 ELSE 0 END) AS undelivered, "
                "sum(CASE WHEN k.alert_id IS NULL THEN 1 ELSE 0 END) AS unacked "
                f"FROM {ALERTS_TABLE} a LEFT JOIN {ACKS_TABLE} k ON k.alert_id = a.id "
                "GROUP BY a.kind, a.model, a.version, a.cohort")
