"""The rollout controller's durable records: runtime per rollout, progress per device, commands.

Everything the controller needs to pick a rollout up again after a restart lives here (in
the fleet database, tables from migration 2), next to what the API shows (`rollouts`,
`rollout_devices`, written through `store.rollouts`). Operator commands that go beyond the
`desired` field (promote, rollback, cancel) are queued in `rollout_commands` and audited
when recorded; the controller marks them done when it acts.

Errors: `RolloutRecords.command` raises NotFound, FleetInputError and Conflict.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from agent.contract.director import TargetRef
from fleet.db.rows import Row, decode_row, dumps
from fleet.errors import Conflict, FleetInputError
from fleet.rollouts.gates import OutcomeCounts

if TYPE_CHECKING:
    from fleet.store import Store

COMMANDS = ("promote", "rollback", "cancel")
FINAL_OUTCOMES = ("succeeded", "install_failed", "local_rollback", "timeout", "reverted",
                  "revert_failed", "skipped")


def ordinal(rollout_id: str, device_id: str) -> str:
    """A stable pseudo-random position in the rollout (sha256), so canaries are a fair sample."""
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


def outcome_counts(rows: list[Row]) -> OutcomeCounts:
    """Forward outcomes of a rollout's progress rows, for the gates."""
    c = Counter(r["outcome"] for r in rows if r["assigned_at"] is not None)
    return OutcomeCounts(assigned=sum(r["assigned_at"] is not None for r in rows), succeeded=c["succeeded"],
                         install_failed=c["install_failed"], timeout=c["timeout"],
                         local_rollback=c["local_rollback"])


def bundle_index(repository: Any) -> dict[str, TargetRef]:
    """Bundle id (`name-version`) -> target, for every labelled target of a `Repository`."""
    out: dict[str, TargetRef] = {}
    for path, info in repository.load("targets").signed.targets.items():
        custom = info.unrecognized_fields.get("custom") or {}
        if custom.get("name") and custom.get("version") and "sha256" in info.hashes:
            out[f"{custom['name']}-{custom['version']}"] = TargetRef(
                path=path, length=info.length, sha256=info.hashes["sha256"],
                name=str(custom["name"]), version=str(custom["version"]))
    return out


class RolloutRecords:
    """Reads and writes of the controller's tables (each call one transaction)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- runtime ----------------------------------------------------------------------------
    def runtime(self, rollout_id: str) -> Row | None:
        with self.store.read() as db:
            rows = list(db.query("SELECT * FROM rollout_runtime WHERE rollout_id = ?", [rollout_id]))
        return decode_row(rows[0], ("breach",)) if rows else None

    def init_runtime(self, rollout_id: str, target_bundle: str, target_path: str, now: float) -> Row:
        with self.store.tx() as db:
            db.table("rollout_runtime").insert(
                {"rollout_id": rollout_id, "phase": "forward", "target_bundle": target_bundle,
                 "target_path": target_path, "started_at": now, "stage_started_at": now,
                 "stage_done_at": None, "breach": "[]", "final_state": None}, replace=True)
        out = self.runtime(rollout_id)
        assert out is not None
        return out

    def update_runtime(self, rollout_id: str, **fields: Any) -> None:
        if "breach" in fields:
            fields["breach"] = dumps(fields["breach"])
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.store.tx() as db:
            db.execute(f"UPDATE rollout_runtime SET {sets} WHERE rollout_id = ?",  # noqa: S608
                       [*fields.values(), rollout_id])

    # -- progress ---------------------------------------------------------------------------
    def add_devices(self, rollout_id: str, device_ids: Iterable[str]) -> int:
        """Add devices to the rollout's cohort (pending); returns how many were new."""
        added = 0
        now = self.store.now()
        with self.store.tx() as db:
            known = {r["device_id"] for r in db.query(
                "SELECT device_id FROM rollout_progress WHERE rollout_id = ?", [rollout_id])}
            for dev in device_ids:
                if dev in known:
                    continue
                db.table("rollout_progress").insert(
                    {"rollout_id": rollout_id, "device_id": dev, "ordinal": ordinal(rollout_id, dev),
                     "from_bundle": None, "assigned_at": None, "acked": 0, "outcome": None,
                     "revert_at": None, "detail": ""})
                db.table("rollout_devices").upsert(
                    {"rollout_id": rollout_id, "device_id": dev, "stage": 0, "status": "pending",
                     "updated_at": now}, pk=("rollout_id", "device_id"))
                added += 1
        return added

    def drop_revoked(self, rollout_id: str, now: float, reverting: bool) -> int:
        """Take revoked devices out of the rollout so they get no more director documents.

        Never-assigned ones leave the cohort (as if revoked before the rollout started, when
        the selector would not have picked them); assigned ones whose forward step (or, when
        `reverting`, revert step) is still open are closed as `skipped`. Returns how many rows
        changed.
        """
        still_open = ("p.revert_at IS NULL OR p.outcome = 'reverting'" if reverting else "p.outcome IS NULL")
        with self.store.tx() as db:
            rows = list(db.query(
                "SELECT p.device_id, p.assigned_at FROM rollout_progress p "  # noqa: S608
                "JOIN devices d ON d.id = p.device_id "
                f"WHERE p.rollout_id = ? AND d.revoked = 1 AND (p.assigned_at IS NULL OR {still_open})",
                [rollout_id]))
            for r in rows:
                key = [rollout_id, r["device_id"]]
                if r["assigned_at"] is None:
                    db.execute("DELETE FROM rollout_progress WHERE rollout_id = ? AND device_id = ?", key)
                    db.execute("DELETE FROM rollout_devices WHERE rollout_id = ? AND device_id = ?", key)
                else:
                    self.update_device(rollout_id, r["device_id"], "skipped", outcome="skipped",
                                       revert_at=now, detail="device revoked")
        return len(rows)

    def progress(self, rollout_id: str) -> list[Row]:
        """Every device of the rollout with its status, in canary order."""
        with self.store.read() as db:
            return list(db.query(
                "SELECT p.*, d.status, d.stage FROM rollout_progress p JOIN rollout_devices d "
                "ON d.rollout_id = p.rollout_id AND d.device_id = p.device_id "
                "WHERE p.rollout_id = ? ORDER BY p.ordinal", [rollout_id]))

    def update_device(self, rollout_id: str, device_id: str, status: str | None = None,
                      stage: int | None = None, **fields: Any) -> None:
        """Update progress columns and (when given) the API-visible status, in one transaction."""
        with self.store.tx() as db:
            if fields:
                sets = ", ".join(f"{k} = ?" for k in fields)
                db.execute(f"UPDATE rollout_progress SET {sets} WHERE rollout_id = ? AND device_id = ?",  # noqa: S608
                           [*fields.values(), rollout_id, device_id])
            if status is not None:
                if stage is None:
                    row = db.execute("SELECT stage FROM rollout_devices WHERE rollout_id = ? "
                                     "AND device_id = ?", [rollout_id, device_id]).fetchone()
                    stage = int(row[0]) if row else 0
                self.store.rollouts.set_device_status(rollout_id, device_id, stage, status)

    def open_entries_for(self, device_id: str) -> list[Row]:
        """This device's unfinished (or timed-out) entries in rollouts that are still active."""
        with self.store.read() as db:
            return list(db.query(
                "SELECT p.*, rt.phase, rt.target_bundle FROM rollout_progress p "
                "JOIN rollout_runtime rt ON rt.rollout_id = p.rollout_id "
                "JOIN rollouts r ON r.id = p.rollout_id "
                "WHERE p.device_id = ? AND r.state IN ('running', 'paused', 'rolling_back') "
                "AND (p.assigned_at IS NOT NULL)", [device_id]))

    def reported_states(self, device_ids: list[str]) -> dict[str, Row]:
        """The stored reported state (dict) and online flag of each listed device."""
        out: dict[str, Row] = {}
        with self.store.read() as db:
            for i in range(0, len(device_ids), 500):
                part = device_ids[i:i + 500]
                marks = ", ".join("?" for _ in part)
                for r in db.query(f"SELECT id, reported_state, online FROM devices WHERE id IN ({marks})",  # noqa: S608
                                  part):
                    out[r["id"]] = decode_row(r, ("reported_state",)) or {}
        return out

    def supersede(self, device_id: str, by_rollout: str) -> None:
        """A newer rollout took this device: close its open entries in other active rollouts."""
        with self.store.read() as db:
            rows = list(db.query(
                "SELECT p.rollout_id FROM rollout_progress p JOIN rollouts r ON r.id = p.rollout_id "
                "WHERE p.device_id = ? AND p.rollout_id != ? AND p.outcome IS NULL "
                "AND r.state IN ('running', 'paused', 'rolling_back')", [device_id, by_rollout]))
        for r in rows:
            self.update_device(r["rollout_id"], device_id, "skipped", outcome="skipped",
                               detail=f"superseded by {by_rollout}")

    # -- commands ---------------------------------------------------------------------------
    def command(self, rollout_id: str, command: str, actor: str, note: str = "") -> Row:
        """Queue `promote`, `rollback` or `cancel` for the controller (audited).

        Raises NotFound (rollout), FleetInputError (unknown command), Conflict (finished rollout,
        except `rollback` of a completed one; or the same command already queued).
        """
        if command not in COMMANDS:
            raise FleetInputError(f"command {command!r} must be one of {', '.join(COMMANDS)}")
        with self.store.tx() as db:
            ro = self.store.rollouts.get(rollout_id)
            terminal = ro["state"] in ("completed", "aborted", "failed", "cancelled")
            if terminal and not (command == "rollback" and ro["state"] == "completed"):
                raise Conflict(f"rollout {rollout_id} is {ro['state']}; it cannot {command}")
            if command == "promote" and ro["state"] == "rolling_back":
                raise Conflict(f"rollout {rollout_id} is rolling back; it cannot be promoted")
            if command == "rollback" and ro["state"] == "rolling_back":
                raise Conflict(f"rollout {rollout_id} is already rolling back")
            queued = db.execute("SELECT 1 FROM rollout_commands WHERE rollout_id = ? AND command = ? "
                                "AND done_at IS NULL", [rollout_id, command]).fetchone()
            if queued:
                raise Conflict(f"rollout {rollout_id} already has a pending {command}")
            row = {"rollout_id": rollout_id, "command": command, "actor": actor, "note": note,
                   "created_at": self.store.now(), "done_at": None}
            db.table("rollout_commands").insert(row)
            self.store.audit.record(actor, f"rollout.{command}", f"rollouts/{rollout_id}",
                                    {"state": ro["state"]}, {"command": command, "note": note})
        return row

    def pending_commands(self, rollout_id: str) -> list[Row]:
        with self.store.read() as db:
            return list(db.query("SELECT * FROM rollout_commands WHERE rollout_id = ? AND done_at IS NULL "
                                 "ORDER BY id", [rollout_id]))

    def command_done(self, command_id: int) -> None:
        with self.store.tx() as db:
            db.execute("UPDATE rollout_commands SET done_at = ? WHERE id = ?", [self.store.now(), command_id])

    def active_rollouts(self) -> list[Row]:
        with self.store.read() as db:
            ids = [r["id"] for r in db.query(
                "SELECT id FROM rollouts WHERE state IN ('pending', 'running', 'paused', 'rolling_back') "
                "OR (state = 'completed' AND id IN "
                "(SELECT rollout_id FROM rollout_commands WHERE done_at IS NULL)) ORDER BY created_at, id")]
        return [self.store.rollouts.get(i) for i in ids]
