"""The rollout controller's durable records: runtime per rollout, progress per device, commands.

Everything the controller needs to pick a rollout up again after a restart lives here (in
the fleet database, tables from migration 2), next to what the API shows (`rollouts`,
`rollout_devices`, written through `store.rollouts`). Operator commands that go beyond the
`desired` field (promote, rollback, cancel) are queued in `rollout_commands` and audited
when recorded; the controller marks them done when it acts. Reads return typed records
(`RolloutRuntime`, `DeviceProgress`, ... in `fleet/rollouts/record_types.py`), so
the controller's decisions work on fields, not on row keys.

Errors: `RolloutRecords.command` raises NotFound, FleetInputError and Conflict (also an
`approve` of a rollout that awaits no approval, and a `promote` of one that does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fleet.db.rows import decode_row, dumps
from fleet.errors import Conflict, FleetInputError
from fleet.rollouts.machine import Command, RolloutState
from fleet.rollouts.record_types import (
    DeviceProgress,
    DeviceReport,
    OpenEntry,
    RolloutCommand,
    RolloutRuntime,
    ordinal,
)
from fleet.rollouts.store import FINISHED_STATES, Rollout

if TYPE_CHECKING:
    from fleet.store import Store


COMMANDS = tuple(c.value for c in Command)


class RolloutRecords:
    """Reads and writes of the controller's tables (each call one transaction)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- runtime ----------------------------------------------------------------------------
    def runtime(self, rollout_id: str) -> RolloutRuntime | None:
        with self.store.read() as db:
            found = db.one("SELECT * FROM rollout_runtime WHERE rollout_id = :id", {"id": rollout_id})
        row = decode_row(found, ("breach",)) if found else None
        return RolloutRuntime.from_row(row) if row is not None else None

    def init_runtime(self, rollout_id: str, target_bundle: str, target_path: str,
                     now: float) -> RolloutRuntime:
        with self.store.tx() as db:
            db.upsert(  # a fresh runtime row, as INSERT OR REPLACE made it (every column reset)
                "rollout_runtime",
                {"rollout_id": rollout_id, "phase": "forward", "target_bundle": target_bundle,
                 "target_path": target_path, "started_at": now, "stage_started_at": now,
                 "stage_done_at": None, "breach": "[]", "final_state": None,
                 "shadow_agreement_sum": 0.0, "shadow_compared": 0.0}, key=("rollout_id",))
        out = self.runtime(rollout_id)
        assert out is not None
        return out

    def update_runtime(self, rollout_id: str, **fields: Any) -> None:
        """Set `rollout_runtime` columns; `breach` takes a `GateBreach`."""
        if "breach" in fields:
            fields["breach"] = dumps(dataclasses.asdict(fields["breach"]))
        sets = ", ".join(f"{k} = :{k}" for k in fields)  # keys: column names from the controller
        with self.store.tx() as db:
            db.execute(f"UPDATE rollout_runtime SET {sets} WHERE rollout_id = :rollout_id_",  # noqa: S608
                       {**fields, "rollout_id_": rollout_id})

    def add_shadow_agreement(self, rollout_id: str, agreement: float, compared: float) -> None:
        """Fold one shadow report into the rollout's agreement (durable: the gate reads it back)."""
        with self.store.tx() as db:
            db.execute("UPDATE rollout_runtime SET shadow_agreement_sum = shadow_agreement_sum + :agreed, "
                       "shadow_compared = shadow_compared + :compared WHERE rollout_id = :id",
                       {"agreed": agreement * compared, "compared": compared, "id": rollout_id})

    # -- progress ---------------------------------------------------------------------------
    def add_devices(self, rollout_id: str, device_ids: Iterable[str]) -> int:
        """Add devices to the rollout's cohort (pending); returns how many were new."""
        added = 0
        now = self.store.now()
        with self.store.tx() as db:
            known = {r["device_id"] for r in db.query(
                "SELECT device_id FROM rollout_progress WHERE rollout_id = :id", {"id": rollout_id})}
            new = [dev for dev in dict.fromkeys(device_ids) if dev not in known]
            # Two statements for the whole cohort (10,000 devices at fleet scale), not two per device.
            db.insert("rollout_progress", [
                {"rollout_id": rollout_id, "device_id": dev, "ordinal": ordinal(rollout_id, dev),
                 "from_bundle": None, "assigned_at": None, "acked": 0, "outcome": None, "revert_at": None,
                 "detail": ""} for dev in new])
            db.upsert("rollout_devices", [
                {"rollout_id": rollout_id, "device_id": dev, "stage": 0, "status": "pending",
                 "updated_at": now}
                for dev in new], key=("rollout_id", "device_id"))
            added = len(new)
        return added

    def mark_assigned(self, rollout_id: str, assigned: list[tuple[str, str | None]], stage: int,
                      at: float) -> None:
        """Record a batch of forward documents sent: (device, bundle it ran) each; the bulk form of
        `update_device(..., "assigned", stage=..., assigned_at=..., from_bundle=..., acked=0, detail="")`."""
        now = self.store.now()
        with self.store.tx() as db:
            if not assigned:
                return
            db.execute(
                "UPDATE rollout_progress SET assigned_at = :at, from_bundle = :from_bundle, acked = 0, "
                "detail = '' WHERE rollout_id = :id AND device_id = :device",
                [{"at": at, "from_bundle": from_bundle, "id": rollout_id, "device": dev}
                 for dev, from_bundle in assigned])
            db.upsert("rollout_devices", [
                {"rollout_id": rollout_id, "device_id": dev, "stage": stage, "status": "assigned",
                 "updated_at": now} for dev, _ in assigned], key=("rollout_id", "device_id"))

    def drop_revoked(self, rollout_id: str, now: float, reverting: bool) -> int:
        """Take revoked devices out of the rollout so they get no more director documents.

        Never-assigned ones leave the cohort (as if revoked before the rollout started, when
        the selector would not have picked them); assigned ones whose forward step (or, when
        `reverting`, revert step) is still open are closed as `skipped`. Returns how many rows
        changed.
        """
        still_open = ("p.revert_at IS NULL OR p.outcome = 'reverting'" if reverting else "p.outcome IS NULL")
        with self.store.tx() as db:
            rows = db.query(
                "SELECT p.device_id, p.assigned_at FROM rollout_progress p "  # noqa: S608
                "JOIN devices d ON d.id = p.device_id "
                f"WHERE p.rollout_id = :id AND d.revoked = 1 AND (p.assigned_at IS NULL OR {still_open})",
                {"id": rollout_id})
            for r in rows:
                key = {"id": rollout_id, "device": r["device_id"]}
                if r["assigned_at"] is None:
                    for table in ("rollout_progress", "rollout_devices"):
                        db.execute(f"DELETE FROM {table} WHERE rollout_id = :id AND device_id = :device",  # noqa: S608
                                   key)
                else:
                    self.update_device(rollout_id, r["device_id"], "skipped", outcome="skipped",
                                       revert_at=now, detail="device revoked")
        return len(rows)

    def progress(self, rollout_id: str) -> list[DeviceProgress]:
        """Every device of the rollout with its status, in canary order."""
        with self.store.read() as db:
            return [DeviceProgress.from_row(r) for r in db.query(
                "SELECT p.*, d.status, d.stage FROM rollout_progress p JOIN rollout_devices d "
                "ON d.rollout_id = p.rollout_id AND d.device_id = p.device_id "
                "WHERE p.rollout_id = :id ORDER BY p.ordinal", {"id": rollout_id})]

    def update_device(self, rollout_id: str, device_id: str, status: str | None = None,
                      stage: int | None = None, **fields: Any) -> None:
        """Update progress columns and (when given) the API-visible status, in one transaction."""
        with self.store.tx() as db:
            if fields:
                sets = ", ".join(f"{k} = :{k}" for k in fields)  # keys: column names from the controller
                db.execute(f"UPDATE rollout_progress SET {sets} "  # noqa: S608
                           "WHERE rollout_id = :rollout_id_ AND device_id = :device_id_",
                           {**fields, "rollout_id_": rollout_id, "device_id_": device_id})
            if status is not None:
                if stage is None:
                    row = db.execute("SELECT stage FROM rollout_devices WHERE rollout_id = :id "
                                     "AND device_id = :device", {"id": rollout_id,
                                                                 "device": device_id}).fetchone()
                    stage = int(row[0]) if row else 0
                self.store.rollouts.set_device_status(rollout_id, device_id, stage, status)

    def open_entries_for(self, device_id: str) -> list[OpenEntry]:
        """This device's unfinished (or timed-out) entries in rollouts that are still active."""
        with self.store.read() as db:
            return [OpenEntry.from_row(r) for r in db.query(
                "SELECT p.*, rt.phase, rt.target_bundle FROM rollout_progress p "
                "JOIN rollout_runtime rt ON rt.rollout_id = p.rollout_id "
                "JOIN rollouts r ON r.id = p.rollout_id "
                "WHERE p.device_id = :device "
                "AND r.state IN ('running', 'paused', 'awaiting_approval', 'rolling_back') "
                "AND (p.assigned_at IS NOT NULL)", {"device": device_id})]

    def reported_states(self, device_ids: list[str]) -> dict[str, DeviceReport]:
        """Stored reported state and online flag per device (absent: unknown, or state unsigned)."""
        out: dict[str, DeviceReport] = {}
        with self.store.read() as db:
            for i in range(0, len(device_ids), 500):
                part = device_ids[i:i + 500]
                for r in db.query("SELECT id, reported_state, online FROM devices WHERE id IN :ids "
                                  "AND reported_signed = 1", {"ids": part}):  # success: signed reports only
                    out[r["id"]] = DeviceReport.from_row(decode_row(r, ("reported_state",)) or {})
        return out

    def labels_of(self, device_ids: list[str]) -> dict[str, dict[str, str]]:
        """The fleet-set labels of each listed device (for budgets and windows; absent if unknown)."""
        out: dict[str, dict[str, str]] = {}
        with self.store.read() as db:
            for i in range(0, len(device_ids), 500):
                part = {"ids": device_ids[i:i + 500]}
                for r in db.query("SELECT id, labels FROM devices WHERE id IN :ids", part):
                    labels = decode_row(r, ("labels",)) or {}
                    out[r["id"]] = {str(k): str(v) for k, v in (labels.get("labels") or {}).items()}
        return out

    def supersede(self, device_id: str, by_rollout: str) -> None:
        """A newer rollout took this device: close its open entries in other active rollouts."""
        self.supersede_many([device_id], by_rollout)

    def supersede_many(self, device_ids: list[str], by_rollout: str) -> None:
        """`supersede` for a batch (one query per 500 devices)."""
        rows = []
        with self.store.read() as db:
            for i in range(0, len(device_ids), 500):
                rows += db.query(
                    "SELECT p.rollout_id, p.device_id FROM rollout_progress p "
                    "JOIN rollouts r ON r.id = p.rollout_id "
                    "WHERE p.device_id IN :ids AND p.rollout_id != :by AND p.outcome IS NULL "
                    "AND r.state IN ('running', 'paused', 'awaiting_approval', 'rolling_back')",
                    {"ids": device_ids[i:i + 500], "by": by_rollout})
        for r in rows:
            self.update_device(r["rollout_id"], r["device_id"], "skipped", outcome="skipped",
                               detail=f"superseded by {by_rollout}")

    # -- commands ---------------------------------------------------------------------------
    def command(self, rollout_id: str, command: str, actor: str, note: str = "") -> RolloutCommand:
        """Queue `promote`, `rollback` or `cancel` for the controller (audited).

        Raises NotFound (rollout), FleetInputError (unknown command), Conflict (finished rollout,
        except `rollback` of a completed one; or the same command already queued).
        """
        if command not in COMMANDS:
            raise FleetInputError(f"command {command!r} must be one of {', '.join(COMMANDS)}")
        with self.store.tx() as db:
            ro = self.store.rollouts.get(rollout_id)
            finished = ro.state in FINISHED_STATES
            if finished and not (command == "rollback" and ro.state is RolloutState.COMPLETED):
                raise Conflict(f"rollout {rollout_id} is {ro.state}; it cannot {command}")
            if command == "promote" and ro.state is RolloutState.ROLLING_BACK:
                raise Conflict(f"rollout {rollout_id} is rolling back; it cannot be promoted")
            if command == "rollback" and ro.state is RolloutState.ROLLING_BACK:
                raise Conflict(f"rollout {rollout_id} is already rolling back")
            if command == "promote" and ro.state is RolloutState.AWAITING_APPROVAL:
                raise Conflict(f"rollout {rollout_id} awaits approval of stage {ro.stage}; approve it")
            if command == "approve" and ro.state not in (RolloutState.AWAITING_APPROVAL, RolloutState.PAUSED):
                raise Conflict(f"rollout {rollout_id} is {ro.state}, not awaiting approval")
            queued = db.execute("SELECT 1 FROM rollout_commands WHERE rollout_id = :id "
                                "AND command = :command AND done_at IS NULL",
                                {"id": rollout_id, "command": command}).fetchone()
            if queued:
                raise Conflict(f"rollout {rollout_id} already has a pending {command}")
            row = {"rollout_id": rollout_id, "command": command, "actor": actor, "note": note,
                   "created_at": self.store.now(), "done_at": None}
            command_id = db.insert_id("rollout_commands", row)
            self.store.audit.record(actor, f"rollout.{command}", f"rollouts/{rollout_id}",
                                    {"state": ro.state}, {"command": command, "note": note})
        return RolloutCommand.from_row({**row, "id": command_id})

    def pending_commands(self, rollout_id: str) -> list[RolloutCommand]:
        with self.store.read() as db:
            return [RolloutCommand.from_row(r) for r in db.query(
                "SELECT * FROM rollout_commands WHERE rollout_id = :id AND done_at IS NULL ORDER BY id",
                {"id": rollout_id})]

    def command_done(self, command_id: int) -> None:
        with self.store.tx() as db:
            db.execute("UPDATE rollout_commands SET done_at = :at WHERE id = :id",
                       {"at": self.store.now(), "id": command_id})

    def active_rollouts(self) -> list[Rollout]:
        with self.store.read() as db:
            ids = [r["id"] for r in db.query(
                "SELECT id FROM rollouts "
                "WHERE state IN ('pending', 'running', 'paused', 'awaiting_approval', 'rolling_back') "
                "OR (state = 'completed' AND id IN "
                "(SELECT rollout_id FROM rollout_commands WHERE done_at IS NULL)) ORDER BY created_at, id")]
        return [self.store.rollouts.get(i) for i in ids]
