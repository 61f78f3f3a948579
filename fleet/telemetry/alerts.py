"""Alerts and retraining triggers: episodes over observations, persisted, delivered, acknowledged.

Kinds: `drift` (a subject of a model version's windows drifted), `retrain` (the `dataset` or
`prediction` drift episode lasted `persist_windows` windows), `error_rate` and `latency` (a
version serves worse than its cohort's baseline version), `offline` (devices silent beyond a
threshold) and `rollout_gate` (a gate paused or aborted a rollout); fleet/telemetry/health.py
observes the last four. Whatever the kind, one alert is sent per *episode*, not per window or
cycle (fleet/telemetry/alert_rules.py, `step_episode`): an episode ends after
`clear_windows` consecutive clean observations, so a flapping condition stays one episode, and
observations without enough evidence leave it as it is.

Drift: each window of a (model, version, cohort) is tested against the reference profile
(`fleet.telemetry.drift.report_drift`) once, in time order. Subjects are each input feature,
each output as `output:<name>`, `dataset` and `prediction`; each has its own episode. The
`dataset` episode remembers the drifted features its alerts named (`features`): when a later
window drifts on features the episode has not named yet, it *escalates*: a new `drift` alert
with the same `episode` and a higher `escalation`, naming the whole current set (why the same
episode: see alert_rules.py). The other kinds' subjects: `error_rate`/`latency` per (model,
candidate version, cohort), `devices` for `offline` (its members are the devices: one alert
names every device that went silent at once, an escalation the ones that followed), and the
rollout id for `rollout_gate` (members: the stages that breached).

Alerts are persisted (`fleet.db`: alerts.db, or PostgreSQL) before delivery
(fleet/telemetry/alert_delivery.py: webhook and/or command); failed deliveries are recorded and
retried by `redeliver()`; an operator acknowledges each alert once (`ack`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry import TelemetryReport
from agent.logs import log_event
from fleet.db.database import Database
from fleet.db.session import Db
from fleet.errors import Conflict, NotFound
from fleet.telemetry.alert_delivery import deliver
from fleet.telemetry.alert_records import (
    ACKS_TABLE,
    ALERTS_TABLE,
    CURSOR_TABLE,
    EPISODES_TABLE,
    HEALTH_EPISODES_TABLE,
    KINDS,
    Alert,
    AlertConfig,
    Observation,
)
from fleet.telemetry.alert_rules import Episode, step_episode
from fleet.telemetry.drift import DriftReport, FeatureDrift, report_drift

log = logging.getLogger("edgefleet.fleet.alerts")

__all__ = ["KINDS", "Alert", "AlertConfig", "AlertManager", "Observation"]  # the records, re-exported

def _subjects(d: DriftReport) -> list[tuple[str, FeatureDrift | None, bool, frozenset[str]]]:
    """(subject, deciding verdict or None, drifted, members) for every subject of a window;
    subjects without enough samples are left out (their episodes stay as they are)."""
    out: list[tuple[str, FeatureDrift | None, bool, frozenset[str]]] = []
    judged = [f for f in d.features if f.method != "insufficient"]
    outputs = [o for o in d.outputs if o.method != "insufficient"]
    out += [(f.name, f, f.drifted, frozenset({f.name})) for f in judged]
    out += [(f"output:{o.name}", o, o.drifted, frozenset({f"output:{o.name}"})) for o in outputs]
    if judged:
        out.append(("dataset", None, d.dataset_drift, frozenset(f.name for f in judged if f.drifted)))
    if outputs:
        out.append(("prediction", None, d.prediction_drift,
                    frozenset(f"output:{o.name}" for o in outputs if o.drifted)))
    return out


def _decoded(r: dict[str, Any]) -> dict[str, Any]:
    """The JSON columns of an alert row, decoded (rows written before a column existed: defaults)."""
    return {"devices": json.loads(r["devices"]), "features": json.loads(r.get("features") or "[]"),
            "evidence": json.loads(r.get("evidence") or "{}"), "escalation": int(r.get("escalation") or 0),
            "baseline": r.get("baseline") or "", "detail": r.get("detail") or "",
            "episode": r.get("episode") if r.get("episode") is not None else r["id"]}


def _episode(row: dict[str, Any] | None) -> Episode | None:
    if row is None:
        return None
    return Episode(float(row["first_window"]), float(row["last_window"]), int(row["consecutive"]),
                   int(row.get("clear_streak") or 0), frozenset(json.loads(row.get("members") or "[]")),
                   int(row.get("escalations") or 0), row.get("alert_id"))


def _episode_row(e: Episode) -> dict[str, Any]:
    return {"first_window": e.opened_at, "last_window": e.last_seen, "consecutive": e.consecutive,
            "clear_streak": e.clear_streak, "members": json.dumps(sorted(e.members)),
            "escalations": e.escalations, "alert_id": e.alert_id}


class AlertManager:
    """Evaluate windows and observations, keep episode state and deliver alerts. `http` is an
    optional httpx client (tests and services pass their own). Raises `FleetMisuseError` when
    the database cannot be opened."""

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
        self._lock = threading.RLock()  # evaluate/observe/redeliver may run on different threads
        self.database = Database(location, "alerts", "alerts database")

    def close(self) -> None:
        self.database.close()

    # -- drift ------------------------------------------------------------------------------
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
        at = float(w["window_start"])
        match = "model = :model AND version = :version AND cohort = :cohort AND subject = :subject"
        for subject, f, drifted, members in _subjects(verdict):
            key = (model, version, cohort, subject)
            names = {"model": model, "version": version, "cohort": cohort, "subject": subject}
            row = db.one(f"SELECT * FROM {EPISODES_TABLE} WHERE {match}", names)  # noqa: S608
            episode = _episode(row)
            if episode is not None and row is not None and row["members"] is None:
                # opened before episodes kept their members (alerts_0001): what it names now is
                # what it named then as far as anyone knows, so no escalation on the first window
                episode = replace(episode, members=members)
            step = step_episode(episode, drifted, at, self.config.clear_windows, members)
            if step.ended:
                db.execute(f"DELETE FROM {EPISODES_TABLE} WHERE {match}", names)  # noqa: S608
                log_event(log, "drift.episode_closed", model=model, version=version, cohort=cohort,
                          subject=subject)
            if step.episode is None:
                continue
            ep, retrain_fired = step.episode, bool(row and row["retrain_fired"])
            if step.opened or step.escalated:
                alert = self._persist(db, self._alert("drift", key, f, verdict, w, window_s, ep.consecutive,
                                                  ep, sorted(members), step.escalated))
                fired.append(alert)
                if step.opened:
                    ep = replace(ep, alert_id=alert.id)
            if (subject in ("dataset", "prediction") and not retrain_fired
                    and ep.consecutive >= self.config.persist_windows):
                retrain_fired = True
                fired.append(self._persist(db, self._alert("retrain", key, f, verdict, w, window_s,
                                                       ep.consecutive, ep, sorted(members), frozenset())))
            db.upsert(EPISODES_TABLE, {**names, "retrain_fired": int(retrain_fired), **_episode_row(ep)},
                      key=("model", "version", "cohort", "subject"))
        return fired

    def _alert(
        self, kind: str, key: tuple[str, str, str, str], f: FeatureDrift | None, verdict: DriftReport,
        w: dict[str, Any], window_s: float, windows: int, ep: Episode, features: list[str],
        escalated: frozenset[str],
    ) -> Alert:
        model, version, cohort, subject = key
        if f is not None:
            statistic, value, threshold = f.method, f.statistic, f.threshold
        elif subject == "dataset":
            statistic, value = "drift_share", verdict.drifted_share
            threshold = self.config.thresholds.dataset_drift_share
        else:
            statistic, value, threshold = "outputs_drifted", sum(o.drifted for o in verdict.outputs), 1.0
        detail = f"newly drifted in this episode: {', '.join(sorted(escalated))}" if escalated else ""
        return Alert(kind, model, version, cohort, subject, statistic, float(value), float(threshold),
                     float(w["window_start"]), window_s, windows, list(w["devices"]), int(w["device_count"]),
                     self._clock(), episode=ep.alert_id, escalation=ep.escalations if escalated else 0,
                     features=features, detail=detail)

    # -- the other kinds ----------------------------------------------------------------------
    def observe(self, observations: list[Observation]) -> list[Alert]:
        """Step each observation's episode (`alert_episodes`); persist and deliver an alert for
        every episode that opened or escalated; returns them."""
        fired: list[Alert] = []
        with self._lock:
            with self.database.tx() as db:
                for o in observations:
                    fired += self._observe_one(db, o)
            for a in fired:
                self._deliver(a)
        return fired

    def _observe_one(self, db: Db, o: Observation) -> list[Alert]:
        key = {"kind": o.kind, "model": o.model, "version": o.version, "cohort": o.cohort,
               "subject": o.subject}
        match = " AND ".join(f"{k} = :{k}" for k in key)
        row = db.one(f"SELECT * FROM {HEALTH_EPISODES_TABLE} WHERE {match}", key)  # noqa: S608
        step = step_episode(_episode(row), o.firing, o.at, o.clear_after or self.config.clear_windows,
                            o.members)
        if step.ended:
            db.execute(f"DELETE FROM {HEALTH_EPISODES_TABLE} WHERE {match}", key)  # noqa: S608
            log_event(log, "alert.episode_closed", logging.INFO, **key)
        if step.episode is None:
            return []
        ep, fired = step.episode, []
        if step.opened or step.escalated:
            new = f"; new: {', '.join(sorted(step.escalated))}" if step.escalated else ""
            alert = self._persist(db, Alert(
                o.kind, o.model, o.version, o.cohort, o.subject, o.statistic, o.value, o.threshold, o.at,
                o.window_s, ep.consecutive, list(o.devices), len(o.devices), self._clock(),
                episode=ep.alert_id, escalation=ep.escalations if step.escalated else 0,
                features=sorted(o.members), baseline=o.baseline, detail=o.detail + new,
                evidence=dict(o.evidence)))
            fired.append(alert)
            if step.opened:
                ep = replace(ep, alert_id=alert.id)
        db.upsert(HEALTH_EPISODES_TABLE, key | _episode_row(ep), key=tuple(key))
        return fired

    def open_episodes(self, kind: str) -> list[dict[str, Any]]:
        """The open episodes of a non-drift kind (subject, model, version, cohort, members)."""
        with self._lock, self.database.read() as db:
            rows = db.query(f"SELECT * FROM {HEALTH_EPISODES_TABLE} WHERE kind = :kind "  # noqa: S608
                            "ORDER BY model, version, cohort, subject", {"kind": kind})
        return [{**r, "members": json.loads(r["members"] or "[]")} for r in rows]

    # -- persistence and delivery -------------------------------------------------------------
    def _persist(self, db: Db, a: Alert) -> Alert:
        """Insert the alert (inside the caller's transaction); it names its own episode when it
        opened one."""
        rec = asdict(a)
        rec.pop("id")
        rec.update(devices=json.dumps(a.devices), features=json.dumps(a.features),
                   evidence=json.dumps(a.evidence), episode=a.episode, delivered=0, delivery_error="")
        alert_id = db.insert_id(ALERTS_TABLE, rec)
        if a.episode is None:  # it opened its episode: the episode is named after it
            db.execute(f"UPDATE {ALERTS_TABLE} SET episode = :id WHERE id = :id", {"id": alert_id})  # noqa: S608
        row = db.one(f"SELECT * FROM {ALERTS_TABLE} WHERE id = :id", {"id": alert_id})  # noqa: S608
        assert row is not None
        return self._from_row(row)

    def _deliver(self, alert: Alert) -> bool:
        errors = deliver(asdict(alert), self.config.webhook_url, self.config.command,
                         self.config.webhook_timeout_s, self.config.command_timeout_s, self._http)
        error = "; ".join(errors)
        assert alert.id is not None, "alerts are persisted before delivery"
        with self.database.tx() as db:
            db.execute(f"UPDATE {ALERTS_TABLE} SET delivered = :delivered, delivery_error = :error "  # noqa: S608
                       "WHERE id = :id", {"delivered": int(not errors), "error": error, "id": alert.id})
        log_event(log, f"alert.{alert.kind}", subject=alert.subject, model=alert.model, version=alert.version,
                  cohort=alert.cohort, escalation=alert.escalation, delivered=not errors, error=error)
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
        fields.update(_decoded(r))
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
        log_event(log, "alert.acked", alert_id=alert_id, actor=actor)
        return before, after

    @staticmethod
    def _public(r: dict[str, Any]) -> dict[str, Any]:
        out = dict(r)
        out.update(_decoded(r))
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
