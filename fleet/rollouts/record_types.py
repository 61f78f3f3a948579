"""The rollout controller's typed records: runtime per rollout, progress per device, commands.

Plain frozen values built from stored rows (`from_row`), so the controller's decisions work on
fields, not on row keys; `fleet/rollouts/records.py` reads and writes them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from agent.contract.director import TargetRef
from fleet.db.rows import Row
from fleet.rollouts.gates import OutcomeCounts
from fleet.rollouts.machine import Command, RolloutEvent, RolloutState, revert_final_state
from fleet.rollouts.store import record_from_row

FINAL_OUTCOMES = ("succeeded", "install_failed", "local_rollback", "timeout", "reverted",
                  "revert_failed", "skipped", "window_missed")


class RuntimePhase(StrEnum):
    """`rollout_runtime.phase`: which half of the lifecycle the devices are in."""

    FORWARD = "forward"  # running or paused: devices go to the target bundle
    ROLLBACK = "rollback"  # rolling back: assigned devices go back to their previous bundle
    DONE = "done"  # completed, aborted or cancelled: nothing is sent


#: The runtime phase each state the controller enters implies (the rest have no runtime yet).
PHASE_OF_STATE: Mapping[RolloutState, RuntimePhase] = MappingProxyType({
    RolloutState.RUNNING: RuntimePhase.FORWARD, RolloutState.PAUSED: RuntimePhase.FORWARD,
    RolloutState.AWAITING_APPROVAL: RuntimePhase.FORWARD,
    RolloutState.ROLLING_BACK: RuntimePhase.ROLLBACK, RolloutState.COMPLETED: RuntimePhase.DONE,
    RolloutState.ABORTED: RuntimePhase.DONE, RolloutState.ROLLED_BACK: RuntimePhase.DONE,
    RolloutState.CANCELLED: RuntimePhase.DONE})


@dataclass(frozen=True, slots=True)
class GateBreach:
    """The last gate breach of a rollout (`rollout_runtime.breach`): its stage and the gates."""

    stage: int
    acked: bool  # the operator resumed since: this stage's gates are not judged again
    items: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RolloutRuntime:
    """`rollout_runtime`: what the controller resolved at the start and its stage clock."""

    rollout_id: str
    phase: RuntimePhase
    target_bundle: str  # bundle id (name-version) being rolled out
    target_path: str  # its TUF target path
    started_at: float
    stage_started_at: float
    stage_done_at: float | None  # every device of the stage final (the bake starts)
    breach: GateBreach | None
    final_state: str | None
    shadow_agreement_sum: float = 0.0  # sum of label agreement x rows compared (migration 4)
    shadow_compared: float = 0.0  # rows compared by the devices' shadow reports
    approved_stage: int = -1  # the last stage an operator approved (migration 10)
    approval_requested_at: float | None = None  # when the rollout began awaiting approval

    @property
    def shadow_agreement(self) -> float | None:
        """Mean label agreement of the shadow model over every compared row (None before any)."""
        return self.shadow_agreement_sum / self.shadow_compared if self.shadow_compared > 0 else None

    @classmethod
    def from_row(cls, row: Row) -> RolloutRuntime:
        raw = row["breach"]  # JSON: `[]` until a first breach, then an object
        breach = GateBreach(int(raw["stage"]), bool(raw.get("acked")), list(raw.get("items") or [])) \
            if isinstance(raw, dict) else None
        return record_from_row(cls, row, phase=RuntimePhase(row["phase"]), breach=breach)

    def on_entry(self, state: RolloutState, events: Iterable[RolloutEvent] = ()) -> dict[str, Any]:
        """The columns entering `state` by `events` changes: the phase, and for a rollback
        phase where it ends (`machine.REVERT_END`: aborted or rolled_back)."""
        phase = PHASE_OF_STATE.get(state)
        fields: dict[str, Any] = {}
        if phase is not None and phase is not self.phase:
            fields["phase"] = phase.value
            final = revert_final_state(events) if phase is RuntimePhase.ROLLBACK else None
            if final is not None:
                fields["final_state"] = final.value
        return fields


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    """One device of a rollout: `rollout_progress` with its API-visible status and stage."""

    rollout_id: str
    device_id: str
    ordinal: str
    from_bundle: str | None  # what the device ran when assigned
    assigned_at: float | None  # forward document published
    acked: bool  # the device accepted the current document
    outcome: str | None
    revert_at: float | None  # rollback document published
    detail: str
    status: str
    stage: int
    hold_seen_at: float | None = None  # last report of a hold (window or resources), migration 10

    @classmethod
    def from_row(cls, row: Row) -> DeviceProgress:
        return record_from_row(cls, row, acked=bool(row["acked"]))


@dataclass(frozen=True, slots=True)
class OpenEntry:
    """A device's assigned entry in a rollout that is still active (where its events go)."""

    rollout_id: str
    device_id: str
    from_bundle: str | None
    assigned_at: float
    acked: bool
    outcome: str | None
    phase: RuntimePhase
    target_bundle: str

    @classmethod
    def from_row(cls, row: Row) -> OpenEntry:
        return record_from_row(cls, row, acked=bool(row["acked"]), phase=RuntimePhase(row["phase"]))


@dataclass(frozen=True, slots=True)
class RolloutCommand:
    """One queued operator command (`rollout_commands`); `done_at` once the controller acted."""

    id: int
    rollout_id: str
    command: Command
    actor: str
    note: str
    created_at: str
    done_at: str | None

    @classmethod
    def from_row(cls, row: Row) -> RolloutCommand:
        return record_from_row(cls, row, command=Command(row["command"]))


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """The parts of a device's stored reported state the controller reads (absent = None)."""

    state: str | None = None
    active_bundle: str | None = None
    previous_bundle: str | None = None
    timestamp: float = 0.0  # 0 when the report carries none
    online: bool = False
    features: tuple[str, ...] = ()  # optional protocol features the agent implements (`delta`)
    install_origin: str = ""  # `offline_install` when the active bundle came from an imported file

    hold: str | None = None  # `waiting_for_window` or `held: <why>` while the agent holds the update

    @classmethod
    def from_row(cls, row: Row) -> DeviceReport:
        rep = row.get("reported_state") or {}
        return cls(state=rep.get("state"), active_bundle=rep.get("active_bundle"),
                   previous_bundle=rep.get("previous_bundle"), timestamp=float(rep.get("timestamp") or 0),
                   online=bool(row.get("online")),
                   features=tuple(str(f) for f in rep.get("features") or ()),
                   install_origin=str(rep.get("install_origin") or ""),
                   hold=str(rep["hold"]) if rep.get("hold") else None)


#: A device with no stored report (or not in the inventory).
NO_REPORT = DeviceReport()


def ordinal(rollout_id: str, device_id: str) -> str:
    """A stable pseudo-random position in the rollout (sha256), so canaries are a fair sample."""
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


def outcome_counts(rows: list[DeviceProgress]) -> OutcomeCounts:
    """Forward outcomes of a rollout's progress rows, for the gates."""
    c = Counter(r.outcome for r in rows if r.assigned_at is not None)
    return OutcomeCounts(assigned=sum(r.assigned_at is not None for r in rows), succeeded=c["succeeded"],
                         install_failed=c["install_failed"], timeout=c["timeout"],
                         local_rollback=c["local_rollback"], window_missed=c["window_missed"])


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
