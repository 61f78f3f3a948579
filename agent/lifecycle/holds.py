"""Holds: an update that waits, on the device, for its maintenance window or for resources.

A hold is not a failure and not a state of its own: the lifecycle rests where it is (`idle`
before the download, `staged` before the activation), records why in the state record
(`StateRecord.hold`, published in the reported state as `hold`) and when to look again
(`retry_at`), and says so once with an `update_held` event (again only when the reason
changes). When the hold clears, an `update_resumed` event follows and the update carries on.

Windows are judged with the device's own clock and zone (the director document's `tz`, else
the agent's configured zone or its `tz` label, else UTC), so they hold offline too. Resource
holds back off (`ResourcePolicy.backoff`); a window hold looks again when the window opens.
Pure functions over the record, the windows, a probe reading and a clock; no I/O here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from agent.contract.windows import UpdateWindows, next_opening, zone
from agent.lifecycle.resources import ResourcePolicy, Resources, shortfall
from agent.lifecycle.state_store import StateRecord

#: The reported `hold` of a device outside its window (resource holds: `held: <why>`).
WAITING_FOR_WINDOW = "waiting_for_window"
Step = Literal["download", "activation"]


@dataclass(frozen=True)
class Hold:
    """Why the step waits and when to look again (epoch seconds, the lifecycle's clock)."""

    reason: str
    until: float
    resources: bool = False  # counted for the backoff


def window_hold(windows: UpdateWindows | None, step: Step, default_tz: str | None, now: float) -> Hold | None:
    """A hold until `step`'s window opens (None: open now, or no window)."""
    window = None if windows is None else (windows.download if step == "download" else windows.activation)
    if window is None:
        return None
    try:
        tz = zone(windows.tz if windows is not None and windows.tz else default_tz)
    except ValueError:  # the agent's configured zone is checked at load; the document's by the fleet
        tz = zone(None)
    opens = next_opening(window, tz, now)
    return None if opens <= now else Hold(WAITING_FOR_WINDOW, opens)


def resource_hold(policy: ResourcePolicy, free: Resources, holds: int, now: float, disk_bytes: int = 0,
                  memory_mb: float = 0.0) -> Hold | None:
    """A hold while the device is short of what the step needs (backoff by `holds` so far)."""
    why = shortfall(policy, free, disk_bytes, memory_mb)
    return None if why is None else Hold(f"held: {why}", now + policy.backoff(holds + 1), resources=True)


def apply_hold(record: StateRecord, hold: Hold | None, report: Callable[..., Any], bundle: str) -> bool:
    """Record `hold` (or that none holds any more), reporting a start, a new reason or the end.

    Returns True while held: the caller rests in its state.
    """
    if hold is None:
        if record.hold:
            report("update_resumed", bundle=bundle, reason=f"was {record.hold}")
            record.hold, record.holds, record.retry_at = None, 0, 0.0
        return False
    if record.hold != hold.reason:
        report("update_held", bundle=bundle, reason=hold.reason)
    record.hold = hold.reason
    record.retry_at = hold.until
    record.holds = record.holds + 1 if hold.resources else 0
    return True
