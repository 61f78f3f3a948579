"""Training job records: created by a trigger or an operator, advanced by the worker only.

`TrainingJobs` over the fleet store (`training_jobs`, `training_logs`; revision store_0011).
The API records intent (`create`, `request_cancel`, `decide_approval`), audited; the worker
changes `state` only through `apply`, which checks the transition table and writes the state
with whatever the step produced in one transaction (`extra` columns, and a `with_tx` callback
for the registration that must commit with it). Log lines are kept per job up to a cap (the
oldest go first); reads are paged by id.

Errors: NotFound (no such job), Conflict (a trigger that already started a job; intent on a
finished job), FleetMisuseError (a transition the table does not allow).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleet.db.audit import AuditRepo
from fleet.db.database import FleetDatabase
from fleet.db.paging import Page
from fleet.db.rows import dumps
from fleet.db.session import Db
from fleet.errors import Conflict, NotFound
from fleet.training.machine import INITIAL_STATE, TERMINAL_STATES, JobEvent, JobState, transition

MAX_HISTORY = 200
JSON_COLUMNS = ("dataset_ids", "metrics", "history")


@dataclass(frozen=True)
class TrainingJob:
    id: str
    model: str
    parent_version: str
    cohort: str
    trigger_alert_id: int | None
    dataset_ids: list[str]
    state: JobState
    step: str
    progress: float
    attempts: int
    worker: str
    cancel_requested: bool
    approval: str | None
    result_version: str | None
    rollout_id: str | None
    metrics: dict[str, Any]
    error: str
    history: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    created_by: str = ""

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> TrainingJob:
        vals = {k: r[k] for k in cls.__dataclass_fields__}
        for col in JSON_COLUMNS:
            vals[col] = json.loads(r[col]) if isinstance(r[col], str) else r[col]
        vals["state"] = JobState(r["state"])
        vals["cancel_requested"] = bool(r["cancel_requested"])
        return cls(**vals)


class TrainingJobs:
    """The job table (module docstring)."""

    def __init__(self, database: FleetDatabase, audit: AuditRepo, clock: Callable[[], float]) -> None:
        self.database = database
        self.audit = audit
        self.clock = clock

    def create(self, model: str, parent_version: str, actor: str, *, cohort: str = "",
               trigger_alert_id: int | None = None, dataset_ids: list[str] | None = None) -> TrainingJob:
        """Record a queued job. Raises Conflict when the trigger already started one."""
        now = self.clock()
        jid = "tj-" + secrets.token_hex(6)
        row = {"id": jid, "model": model, "parent_version": parent_version, "cohort": cohort,
               "trigger_alert_id": trigger_alert_id, "dataset_ids": dumps(list(dataset_ids or [])),
               "state": INITIAL_STATE.value, "created_at": now, "updated_at": now, "created_by": actor,
               "history": dumps([{"at": now, "event": "created", "actor": actor,
                                  "state": INITIAL_STATE.value}])}
        with self.database.tx() as db:
            taken = "SELECT count(*) FROM training_jobs WHERE trigger_alert_id = :t"
            if trigger_alert_id is not None and db.scalar(taken, {"t": trigger_alert_id}):
                raise Conflict(f"retraining trigger {trigger_alert_id} already started a job")
            db.insert("training_jobs", row)
            job = self._get(db, jid)
            self.audit.record(actor, "training_job.create", f"training/jobs/{jid}", None,
                              {"model": model, "parent_version": parent_version, "cohort": cohort,
                               "trigger_alert_id": trigger_alert_id})
        return job

    def _get(self, db: Db, job_id: str) -> TrainingJob:
        row = db.one("SELECT * FROM training_jobs WHERE id = :id", {"id": job_id})
        if row is None:
            raise NotFound(f"training job {job_id!r} not found")
        return TrainingJob.from_row(row)

    def get(self, job_id: str) -> TrainingJob:
        with self.database.read() as db:
            return self._get(db, job_id)

    def by_trigger(self, alert_id: int) -> TrainingJob | None:
        with self.database.read() as db:
            row = db.one("SELECT * FROM training_jobs WHERE trigger_alert_id = :t", {"t": alert_id})
        return None if row is None else TrainingJob.from_row(row)

    def page(self, cursor: str | None, limit: int, state: str | None = None,
             model: str | None = None) -> Page[TrainingJob]:
        sql, args = "SELECT * FROM training_jobs WHERE 1 = 1", dict[str, object]()
        if state is not None:
            sql, args["state"] = sql + " AND state = :state", state
        if model is not None:
            sql, args["model"] = sql + " AND model = :model", model
        return self.database.page_of(sql, args, "id", cursor, limit, TrainingJob.from_row)

    def covering(self, model: str, parent_version: str, cohort: str, since: float) -> TrainingJob | None:
        """A job already answering a trigger of (model, version, cohort): one of this parent and
        cohort, or of this cohort created after `since` (the policy's cooldown: the version a job
        made is not retrained at once), unless it failed or was cancelled (a new trigger retries)."""
        with self.database.read() as db:
            row = db.one("SELECT * FROM training_jobs WHERE model = :m AND cohort = :c "
                         "AND (parent_version = :v OR created_at >= :since) "
                         "AND state NOT IN ('failed', 'cancelled') ORDER BY created_at DESC LIMIT 1",
                         {"m": model, "v": parent_version, "c": cohort, "since": since})
        return None if row is None else TrainingJob.from_row(row)

    def unfinished(self) -> list[TrainingJob]:
        done = ", ".join(f"'{s.value}'" for s in TERMINAL_STATES)
        with self.database.read() as db:
            rows = db.query(f"SELECT * FROM training_jobs WHERE state NOT IN ({done}) "  # noqa: S608
                            "ORDER BY created_at, id")
        return [TrainingJob.from_row(r) for r in rows]

    # -- the operator's intent ---------------------------------------------------------------
    def request_cancel(self, job_id: str, actor: str) -> TrainingJob:
        """Raises NotFound, Conflict (finished, or publishing: it finishes as a whole)."""
        with self.database.tx() as db:
            job = self._get(db, job_id)
            if job.finished or job.state is JobState.PUBLISHING:
                raise Conflict(f"training job {job_id} is {job.state.value}: it cannot be cancelled")
            db.execute("UPDATE training_jobs SET cancel_requested = 1, updated_at = :now WHERE id = :id",
                       {"id": job_id, "now": self.clock()})
            self.audit.record(actor, "training_job.cancel", f"training/jobs/{job_id}", None, {})
            return self._get(db, job_id)

    def decide_approval(self, job_id: str, approve: bool, actor: str, note: str = "") -> TrainingJob:
        """Approve (the worker starts the canary) or reject. Raises NotFound, Conflict."""
        with self.database.tx() as db:
            job = self._get(db, job_id)
            if job.state is not JobState.AWAITING_APPROVAL or job.approval is not None:
                raise Conflict(f"training job {job_id} is not awaiting approval")
            verdict = "approved" if approve else "rejected"
            db.execute("UPDATE training_jobs SET approval = :a, updated_at = :now WHERE id = :id",
                       {"a": verdict, "id": job_id, "now": self.clock()})
            self.audit.record(actor, f"training_job.{verdict[:-1]}", f"training/jobs/{job_id}", None,
                              {"note": note})
            return self._get(db, job_id)

    # -- the worker --------------------------------------------------------------------------
    def begin_attempt(self, job_id: str, worker: str, step: str) -> TrainingJob:
        """Count one more attempt of the current step, by `worker` (before its work)."""
        with self.database.tx() as db:
            db.execute("UPDATE training_jobs SET attempts = attempts + 1, worker = :w, step = :step, "
                       "updated_at = :now WHERE id = :id",
                       {"w": worker, "step": step, "id": job_id, "now": self.clock()})
            return self._get(db, job_id)

    def apply(self, job_id: str, events: tuple[JobEvent, ...], note: str = "", *,
              extra: dict[str, Any] | None = None, with_tx: Callable[[Db], dict[str, Any]] | None = None,
              actor: str = "training-worker") -> TrainingJob:
        """Persist `events` (the table decides the new state) with `extra` columns and what
        `with_tx(db)` returns, in one transaction. A new step resets `attempts`."""
        with self.database.tx() as db:
            job = self._get(db, job_id)
            state = job.state
            for ev in events:
                state = transition(state, ev)
            cols = dict(extra or {})
            if with_tx is not None:
                cols.update(with_tx(db))
            now = self.clock()
            history = [*job.history, {"at": now, "events": [e.value for e in events], "state": state.value,
                                      "note": note}][-MAX_HISTORY:]
            if state is not job.state and JobEvent.RETRY not in events:
                cols.setdefault("attempts", 0)
            if state is JobState.FAILED and "error" not in cols:
                cols["error"] = note[:2000]
            if JobEvent.RETRY in events:
                cols.setdefault("attempts", job.attempts)
            for k in ("metrics", "dataset_ids"):
                if k in cols:
                    cols[k] = dumps(cols[k])
            cols.update(state=state.value, updated_at=now, history=dumps(history))
            sets = ", ".join(f"{k} = :{k}" for k in cols)
            db.execute(f"UPDATE training_jobs SET {sets} WHERE id = :id", {**cols, "id": job_id})  # noqa: S608
            if state is not job.state:
                self.audit.record(actor, "training_job.state", f"training/jobs/{job_id}",
                                  {"state": job.state.value}, {"state": state.value, "note": note})
            return self._get(db, job_id)

    def set_progress(self, job_id: str, progress: float, step: str) -> None:
        with self.database.tx() as db:
            db.execute("UPDATE training_jobs SET progress = :p, step = :s, updated_at = :now WHERE id = :id",
                       {"p": progress, "s": step[:200], "id": job_id, "now": self.clock()})

    # -- logs --------------------------------------------------------------------------------
    def log(self, job_id: str, lines: list[str], cap: int) -> None:
        """Append lines; keep the newest `cap` of the job's."""
        if not lines:
            return
        with self.database.tx() as db:
            last = db.scalar("SELECT max(seq) FROM training_logs WHERE job_id = :id", {"id": job_id})
            start = 0 if last is None else int(last) + 1
            now = self.clock()
            db.insert("training_logs", [{"job_id": job_id, "seq": start + i, "at": now, "line": ln}
                                        for i, ln in enumerate(lines)])
            db.execute("DELETE FROM training_logs WHERE job_id = :id AND seq < :low",
                       {"id": job_id, "low": start + len(lines) - cap})

    def logs(self, job_id: str, after: int = -1, limit: int = 500) -> list[dict[str, Any]]:
        self.get(job_id)
        with self.database.read() as db:
            return db.query("SELECT seq, at, line FROM training_logs WHERE job_id = :id AND seq > :after "
                            "ORDER BY seq LIMIT :limit", {"id": job_id, "after": after, "limit": limit})
