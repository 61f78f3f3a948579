"""Rollouts: the operator's intent (`desired`) and the controller's view (`state`, `stage`).

The API only records intent: `desired` is `run`, `pause` or `abort`. The rollout controller
(a separate component) reads intent, acts on devices, and writes `state`, `stage` and
`rollout_devices` through `set_state` / `set_device_status`. Until a controller runs, a
rollout honestly stays `pending` whatever the operator asked.

Reads return typed records (`Rollout`, `RolloutDeviceStatus`, `RolloutStatusSummary`), not
rows: the states and intents are the enums of `fleet.rollouts.machine`, so a caller cannot
compare against a misspelt state, and the API's response models take them as they are.

Warnings: a rollout whose cohort is empty (no device in it and none matching its selector)
would otherwise run for ever with 0 devices and look healthy. `with_warnings` and `status`
say so (`EMPTY_COHORT`), and `create` logs `rollout.empty_cohort`; it is a warning, not a
refusal, because devices enrolled later join (`include_late_devices`).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from agent.logs import log_event
from fleet.db.rows import Row, decode_row, dumps, iso
from fleet.devices.selector import parse_selector
from fleet.errors import Conflict, FleetInputError, NotFound
from fleet.rollouts import machine
from fleet.rollouts.machine import Desired, RolloutState
from fleet.rollouts.strategies import StrategyConfig

if TYPE_CHECKING:
    from fleet.store import Store

ROLLOUT_JSON = ("strategy", "thresholds", "history")
STATES = tuple(s.value for s in RolloutState)
#: Finished rollouts refuse intent; the metrics keep only the most recent of them.
FINISHED_STATES = tuple(s.value for s in RolloutState if s in machine.FINISHED_STATES)
ACTIONS = {"pause": Desired.PAUSE, "resume": Desired.RUN, "abort": Desired.ABORT}
DEVICE_STATUSES = ("pending", "assigned", "downloading", "installed", "probation", "succeeded",
                   "failed", "rolled_back", "skipped", "waiting_for_window", "held", "window_missed")
MAX_HISTORY = 500
EMPTY_COHORT = "cohort matches no device"
logger = logging.getLogger("edgefleet.fleet.rollouts")

T = TypeVar("T")


def record_from_row(cls: type[T], row: Row, **typed: Any) -> T:
    """A dataclass record from a row: its fields' columns, with `typed` values overriding.

    Columns that are not fields are left out, so a migration that adds one breaks no read.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: typed[n] if n in typed else row[n] for n in names})


@dataclass(frozen=True, slots=True)
class Rollout:
    """One `rollouts` row, JSON columns decoded: the plan, the intent and the controller's view."""

    id: str
    model_version_id: str
    selector: str
    strategy: dict[str, Any]
    thresholds: dict[str, Any]
    state: RolloutState
    desired: Desired
    stage: int
    created_at: str
    updated_at: str
    created_by: str
    history: list[dict[str, Any]]
    warnings: tuple[str, ...] = ()  # filled by `RolloutRepo.with_warnings` for the API, not stored

    @classmethod
    def from_row(cls, row: Row) -> Rollout:
        return record_from_row(cls, row, state=RolloutState(row["state"]), desired=Desired(row["desired"]),
                               warnings=())


@dataclass(frozen=True, slots=True)
class RolloutDeviceStatus:
    """One `rollout_devices` row: a device's stage and API-visible status in a rollout."""

    rollout_id: str
    device_id: str
    stage: int
    status: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class RolloutStatusSummary:
    """A rollout's state and intent with its devices counted per status."""

    id: str
    state: RolloutState
    desired: Desired
    stage: int
    updated_at: str
    devices_total: int
    devices_by_status: dict[str, int]
    warnings: tuple[str, ...] = ()
    baking_until: str | None = None  # ISO time the current stage's bake ends (None when not baking)
    approval_due: str | None = None  # awaiting approval: when its timeout pauses or aborts (ISO)


@dataclass(frozen=True, slots=True)
class RecordPage(Generic[T]):
    """One page of typed records plus the cursor of the next page (None at the end)."""

    items: list[T]
    next_cursor: str | None = None


class RolloutRepo:
    """Rollout records; intent from the API, progress from the controller."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, model_version_id: str, selector: str, strategy: dict[str, Any],
               thresholds: dict[str, Any], actor: str) -> Rollout:
        """Record a new rollout in state `pending`.

        Raises NotFound (version), FleetInputError (selector), Conflict (archived version).
        """
        parsed = parse_selector(selector)
        now = self.store.now()
        rid = "ro-" + secrets.token_hex(8)
        with self.store.tx() as db:
            version = self.store.models.get_version_by_id(model_version_id)
            if version.stage == "archived":
                raise Conflict(f"{model_version_id} is archived and cannot be rolled out")
            row = {"id": rid, "model_version_id": model_version_id, "selector": str(parsed),
                   "strategy": dumps(strategy), "thresholds": dumps(thresholds), "state": "pending",
                   "desired": "run", "stage": 0, "created_at": now, "updated_at": now, "created_by": actor,
                   "history": dumps([{"at": now, "actor": actor, "event": "created"}])}
            db.insert("rollouts", row)
            out = self.get(rid)
            self.store.audit.record(actor, "rollout.create", f"rollouts/{rid}", None, dataclasses.asdict(out))
        out = self.with_warnings(out)
        if EMPTY_COHORT in out.warnings:
            log_event(logger, "rollout.empty_cohort", logging.WARNING, rollout=rid, selector=out.selector,
                      model_version_id=model_version_id)
        return out

    def get(self, rollout_id: str) -> Rollout:
        """Raises NotFound."""
        with self.store.read() as db:
            found = db.one("SELECT * FROM rollouts WHERE id = :id", {"id": rollout_id})
        out = decode_row(found, ROLLOUT_JSON) if found else None
        if out is None:
            raise NotFound(f"rollout {rollout_id!r} not found")
        return Rollout.from_row(out)

    def with_warnings(self, rollout: Rollout) -> Rollout:
        """`rollout` with what an operator should know about it (for the API's answers)."""
        with self.store.read() as db:
            total = db.scalar("SELECT count(*) FROM rollout_devices WHERE rollout_id = :id",
                              {"id": rollout.id})
        return dataclasses.replace(rollout, warnings=self._warnings(rollout, int(total)))

    def _warnings(self, rollout: Rollout, devices_total: int) -> tuple[str, ...]:
        """`EMPTY_COHORT` while an unfinished rollout has no device and its selector matches none.

        A selector stored before parsing got stricter (`site=`) is reported, not raised.
        """
        if rollout.state in FINISHED_STATES or devices_total:
            return ()
        try:
            matching = self.store.devices.ids_matching(parse_selector(rollout.selector))
        except FleetInputError as exc:
            return (EMPTY_COHORT, f"selector cannot be parsed: {exc}")
        return () if matching else (EMPTY_COHORT,)

    def list(self, cursor: str | None, limit: int, state: str | None = None) -> RecordPage[Rollout]:
        sql, params = "SELECT * FROM rollouts WHERE TRUE", {}
        if state is not None:
            if state not in STATES:
                raise FleetInputError(f"state {state!r} must be one of {', '.join(STATES)}")
            sql += " AND state = :state"
            params["state"] = state
        page = self.store.page(sql, params, "id", cursor, limit, ROLLOUT_JSON)
        return RecordPage([Rollout.from_row(r) for r in page.items], page.next_cursor)

    def _append_history(self, rollout: Rollout, entry: dict[str, Any]) -> str:
        history = [*rollout.history, entry][-MAX_HISTORY:]
        return dumps(history)

    def request(self, rollout_id: str, action: str, actor: str, note: str = "") -> Rollout:
        """Record operator intent `pause`, `resume` or `abort`.

        Raises NotFound, FleetInputError (unknown action), Conflict (finished rollout, or the
        intent is already that, or resuming something not paused).
        """
        if action not in ACTIONS:
            raise FleetInputError(f"action {action!r} must be one of {', '.join(ACTIONS)}")
        desired = ACTIONS[action]
        with self.store.tx() as db:
            before = self.get(rollout_id)
            if before.state in FINISHED_STATES:
                raise Conflict(f"rollout {rollout_id} is {before.state}; it cannot {action}")
            if before.desired is Desired.ABORT:
                raise Conflict(f"rollout {rollout_id} was asked to abort; it cannot {action}")
            if action == "resume" and before.desired is not Desired.PAUSE:
                raise Conflict(f"rollout {rollout_id} is not paused")
            if before.desired is desired:
                raise Conflict(f"rollout {rollout_id} is already asked to {desired}")
            now = self.store.now()
            entry = {"at": now, "actor": actor, "event": f"requested:{action}", "note": note}
            db.execute("UPDATE rollouts SET desired = :desired, updated_at = :now, history = :history "
                       "WHERE id = :id",
                       {"desired": desired.value, "now": now, "history": self._append_history(before, entry),
                        "id": rollout_id})
            after = self.get(rollout_id)
            self.store.audit.record(actor, f"rollout.{action}", f"rollouts/{rollout_id}",
                                    {"desired": before.desired}, {"desired": desired, "note": note})
        return after

    def status(self, rollout_id: str) -> RolloutStatusSummary:
        """The rollout plus device counts per status (from `rollout_devices`). Raises NotFound."""
        rollout = self.get(rollout_id)
        with self.store.read() as db:
            counts = {r["status"]: r["n"] for r in db.query(
                "SELECT status, count(*) AS n FROM rollout_devices WHERE rollout_id = :id GROUP BY status",
                {"id": rollout_id})}
        total = sum(counts.values())
        return RolloutStatusSummary(id=rollout_id, state=rollout.state, desired=rollout.desired,
                                    stage=rollout.stage, updated_at=rollout.updated_at,
                                    devices_total=total, devices_by_status=counts,
                                    warnings=self._warnings(rollout, total),
                                    baking_until=self._baking_until(rollout),
                                    approval_due=self._approval_due(rollout))

    def _baking_until(self, rollout: Rollout) -> str | None:
        """When the bake of a running rollout's current stage ends: its devices are all final
        (the controller's `stage_done_at`) and `bake_s` has not passed yet; None otherwise."""
        if rollout.state is not RolloutState.RUNNING:
            return None
        with self.store.read() as db:
            row = db.execute("SELECT stage_done_at FROM rollout_runtime "
                             "WHERE rollout_id = :id AND phase = :phase",
                             {"id": rollout.id, "phase": "forward"}).fetchone()
        if row is None or row[0] is None:
            return None
        try:
            bake_s = StrategyConfig.parse(rollout.strategy).bake_s
        except FleetInputError:  # a plan stored before a bound got stricter: no bake to report
            return None
        until = float(row[0]) + bake_s
        return iso(until) if bake_s > 0 and until > self.store.clock() else None

    def _approval_due(self, rollout: Rollout) -> str | None:
        """When the approval timeout of a rollout that awaits approval fires (None otherwise)."""
        if rollout.state is not RolloutState.AWAITING_APPROVAL:
            return None
        with self.store.read() as db:
            row = db.execute("SELECT approval_requested_at FROM rollout_runtime WHERE rollout_id = :id",
                             {"id": rollout.id}).fetchone()
        try:
            policy = StrategyConfig.parse(rollout.strategy).approval
        except FleetInputError:
            return None
        if row is None or row[0] is None or policy is None:
            return None
        return iso(float(row[0]) + policy.timeout_s)

    # -- controller side (round 2 writes through these) -------------------------
    def set_state(self, rollout_id: str, state: str, stage: int, actor: str, note: str = "") -> Rollout:
        """The controller reports progress. Raises NotFound, FleetInputError (unknown state)."""
        if state not in STATES:
            raise FleetInputError(f"state {state!r} must be one of {', '.join(STATES)}")
        new = RolloutState(state)
        with self.store.tx() as db:
            before = self.get(rollout_id)
            now = self.store.now()
            entry = {"at": now, "actor": actor, "event": f"state:{new}", "stage": stage, "note": note}
            db.execute("UPDATE rollouts SET state = :state, stage = :stage, updated_at = :now, "
                       "history = :history WHERE id = :id", {"state": new.value, "stage": stage, "now": now,
                                          "history": self._append_history(before, entry), "id": rollout_id})
            self.store.audit.record(actor, "rollout.state", f"rollouts/{rollout_id}",
                                    {"state": before.state, "stage": before.stage},
                                    {"state": new, "stage": stage, "note": note})
            return self.get(rollout_id)

    def set_device_status(self, rollout_id: str, device_id: str, stage: int, status: str) -> None:
        """Upsert one device's progress in a rollout. Raises FleetInputError (unknown status)."""
        if status not in DEVICE_STATUSES:
            raise FleetInputError(f"device status {status!r} must be one of {', '.join(DEVICE_STATUSES)}")
        with self.store.tx() as db:
            db.upsert("rollout_devices",
                      {"rollout_id": rollout_id, "device_id": device_id, "stage": stage, "status": status,
                       "updated_at": self.store.now()}, key=("rollout_id", "device_id"))

    def devices(self, rollout_id: str, cursor: str | None, limit: int,
                status: str | None = None) -> RecordPage[RolloutDeviceStatus]:
        self.get(rollout_id)
        sql, params = "SELECT * FROM rollout_devices WHERE rollout_id = :id", {"id": rollout_id}
        if status is not None:
            sql += " AND status = :status"
            params["status"] = status
        page = self.store.page(sql, params, "device_id", cursor, limit)
        return RecordPage([record_from_row(RolloutDeviceStatus, r) for r in page.items], page.next_cursor)
