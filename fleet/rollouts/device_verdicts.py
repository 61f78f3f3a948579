"""What a device's report, event or silence means for its entry in a rollout: pure verdicts.

The rollout controller reads the devices' stored reported states and the events they send;
these functions say which progress columns and which API-visible status change (a
`DeviceUpdate`), and the controller writes them. Why apart from the controller: they are
the rollout's contract with the agent (success is only "committed", a timeout is upgraded
by a late commit, a report older than the document never counts, a device goes back only
to a bundle the repository still has) and they are tested without a database. No I/O here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.contract.protocol import Event
from fleet.rollouts.record_types import DeviceProgress, DeviceReport, OpenEntry, RuntimePhase
from fleet.rollouts.strategies import StrategyConfig

#: The reported `hold` of a device waiting for its maintenance window (others: `held: <why>`).
WAITING_FOR_WINDOW = "waiting_for_window"
#: How stale `hold_seen_at` may get before it is written again (one write per held device per step).
HOLD_SEEN_STEP_S = 30.0
#: Agent lifecycle state -> the device's status while its outcome is open.
PROGRESS_STATUS = {"downloading": "downloading", "verifying": "downloading", "staged": "installed",
                   "activating": "installed", "probation": "probation", "committed": "probation"}


@dataclass(frozen=True)
class DeviceUpdate:
    """`RolloutRecords.update_device` arguments: the new status (None: unchanged) and columns."""

    status: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)


def forward_update(row: DeviceProgress, report: DeviceReport, target: str, now: float,
                   cfg: StrategyConfig, clock_skew_s: float) -> DeviceUpdate | None:
    """Fold an assigned device's reported state (or its silence) into its forward outcome.

    `row` has no outcome yet or a `timeout` (which a late commit upgrades); an unassigned
    device has nothing to fold.
    """
    assigned_at = row.assigned_at
    if assigned_at is None:
        return None
    fields: dict[str, Any] = {}
    if row.from_bundle is None:  # offline when assigned (its Last Will names no bundle)
        known = report.previous_bundle if report.active_bundle == target else report.active_bundle
        if known and known != target:
            fields["from_bundle"] = known
    if report.state == "idle" and report.active_bundle == target:
        detail = "committed after the timeout" if row.outcome == "timeout" else "committed"
        if report.install_origin == "offline_install":
            detail += " (offline install)"
        return DeviceUpdate("succeeded", {**fields, "outcome": "succeeded", "detail": detail})
    fresh = report.timestamp >= assigned_at - clock_skew_s  # a report since the document
    if row.outcome is None and fresh and report.hold:
        return hold_update(row, report.hold, now, cfg, fields)
    since = max(assigned_at, row.hold_seen_at or 0.0)  # a hold that ended restarts the clock
    if row.outcome is None and now - since > cfg.device_timeout_s:
        detail = f"no commit within {cfg.device_timeout_s:.0f}s (last state {report.state or 'unknown'})"
        return DeviceUpdate("failed", {**fields, "outcome": "timeout", "detail": detail})
    status = None
    if row.outcome is None and fresh:
        progress = PROGRESS_STATUS.get(str(report.state))
        status = progress if progress and progress != row.status else None
    return DeviceUpdate(status, fields) if status or fields else None


def hold_update(row: DeviceProgress, hold: str, now: float, cfg: StrategyConfig,
                fields: dict[str, Any]) -> DeviceUpdate | None:
    """A device that holds its update (`waiting_for_window`, `held: low_memory`, ...).

    It is not timing out: it said why it waits. Past `window_timeout_s` since the document a
    device still waiting for its window has `window_missed` (not a failure); one still held
    for resources times out, with the reason.
    """
    assert row.assigned_at is not None
    waiting = hold.startswith(WAITING_FOR_WINDOW)
    if now - row.assigned_at > cfg.window_timeout_s:
        if waiting:
            return DeviceUpdate("window_missed", {**fields, "outcome": "window_missed", "detail": (
                f"no window opened within {cfg.window_timeout_s:.0f}s")})
        return DeviceUpdate("failed", {**fields, "outcome": "timeout", "detail": (
            f"{hold} for more than {cfg.window_timeout_s:.0f}s")[:1000]})
    status = "waiting_for_window" if waiting else "held"
    fields = dict(fields)
    if row.hold_seen_at is None or now - row.hold_seen_at >= HOLD_SEEN_STEP_S:
        fields["hold_seen_at"] = now
    if status != row.status or row.detail != hold[:1000]:
        fields["detail"] = hold[:1000]
    changed = status if status != row.status else None
    return DeviceUpdate(changed, fields) if changed or fields else None


def event_update(entry: OpenEntry, ev: Event, clock_skew_s: float) -> DeviceUpdate | None:
    """What one device event means for its entry (shadow reports are the controller's)."""
    if entry.phase is RuntimePhase.ROLLBACK:
        if ev.type == "director_accepted" and ev.bundle_id == entry.from_bundle:
            return DeviceUpdate(fields={"acked": 1})
        return None
    if ev.bundle_id != entry.target_bundle and ev.type != "director_refused":
        return None  # about another bundle
    if ev.type == "committed":
        return DeviceUpdate("succeeded", {"outcome": "succeeded", "detail": "committed"})
    if ev.type == "offline_install":  # imported from an offline file, verified like any update
        return DeviceUpdate("succeeded", {"outcome": "succeeded", "detail": "committed (offline install)"})
    if entry.outcome is not None:
        return None
    if ev.type == "director_accepted":
        return DeviceUpdate(fields={"acked": 1})
    if ev.type == "rolled_back":
        return DeviceUpdate("rolled_back", {"outcome": "local_rollback",
                                            "detail": f"rolled back on the device: {ev.reason}"[:1000]})
    if ev.type == "update_failed":
        return DeviceUpdate("failed", {"outcome": "install_failed",
                                       "detail": f"install failed: {ev.reason}"[:1000]})
    if ev.type == "director_refused" and not entry.acked and ev.timestamp >= entry.assigned_at - clock_skew_s:
        return DeviceUpdate("failed", {"outcome": "install_failed",
                                       "detail": f"director document refused: {ev.reason}"[:1000]})
    return None


@dataclass(frozen=True)
class RevertVerdict:
    """One device during a rollback: send it a document naming `send_to` first (if set), then
    record `update`."""

    update: DeviceUpdate
    send_to: str | None = None


def revert_verdict(row: DeviceProgress, report: DeviceReport, target: str, known_bundles: Collection[str],
                   now: float, cfg: StrategyConfig, clock_skew_s: float) -> RevertVerdict | None:
    """Send an assigned device back to the bundle it ran before, then watch it return.

    Devices never assigned, with nothing to return to, or that ran the target before are
    skipped; a previous bundle the repository no longer has fails; a device not back within
    `revert_timeout_s` fails.
    """
    prev = row.from_bundle
    if row.revert_at is None:
        why = ("never assigned" if row.assigned_at is None else
               "no previous bundle to return to" if prev is None else
               "ran this bundle before the rollout" if prev == target else None)
        if why is not None:
            return RevertVerdict(DeviceUpdate("skipped", {"outcome": "skipped", "revert_at": now,
                                                          "detail": f"not reverted: {why}"}))
        if prev not in known_bundles:
            return RevertVerdict(DeviceUpdate("failed", {
                "outcome": "revert_failed", "revert_at": now,
                "detail": f"previous bundle {prev} is not in the repository"}))
        return RevertVerdict(DeviceUpdate(fields={
            "outcome": "reverting", "revert_at": now, "acked": 0,
            "detail": f"returning to {prev} ({row.outcome or 'in flight'})"}), send_to=prev)
    if row.outcome != "reverting":
        return None
    fresh = report.timestamp >= row.revert_at - clock_skew_s
    if report.state == "idle" and report.active_bundle == prev and (row.acked or fresh):
        return RevertVerdict(DeviceUpdate("rolled_back", {"outcome": "reverted",
                                                          "detail": f"back on {prev}"}))
    if now - row.revert_at > cfg.revert_timeout_s:
        return RevertVerdict(DeviceUpdate("failed", {
            "outcome": "revert_failed", "detail": f"not back on {prev} within {cfg.revert_timeout_s:.0f}s"}))
    return None
