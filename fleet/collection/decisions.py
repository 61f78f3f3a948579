"""Where a collection goes next: a pure transition table over its record, the time and drift.

`only_while_drift` is enforced by the **fleet**: it puts the policy into the devices' signed
director documents only while a drift episode of the collection's model version is open, and
re-signs them without it when the episode ends. Why not the device: a device sees only its own
rows, while a drift episode is the fleet's verdict over the merged windows of the cohort; and a
device must never be the one deciding that it may send data. The device obeys the document it
holds, nothing more.

| status            | condition                                  | next              | documents   |
|-------------------|--------------------------------------------|-------------------|-------------|
| pending           | only_while_drift and no drift episode      | waiting_for_drift | -           |
| pending           | otherwise                                  | collecting        | with policy |
| waiting_for_drift | drift episode open                         | collecting        | with policy |
| collecting        | now >= closes_at (max_seconds + grace)     | closed            | without     |
| collecting        | only_while_drift and the episode ended     | waiting_for_drift | without     |
| any not final     | operator stopped it                        | stopped           | without     |
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.collection.records import FINAL, Collection


@dataclass(frozen=True)
class Step:
    status: str
    carry_policy: bool | None  # True: sign documents with it, False: without it, None: publish nothing


def next_status(c: Collection, now: float, drift_open: bool) -> str:
    """The status `c` should have now (itself when nothing changes)."""
    if c.status in FINAL:
        return c.status
    gated = c.policy.only_while_drift
    if c.status in ("pending", "waiting_for_drift"):
        return "waiting_for_drift" if gated and not drift_open else "collecting"
    if c.status == "collecting":
        if c.closes_at and now >= c.closes_at:
            return "closed"
        if gated and not drift_open:
            return "waiting_for_drift"
    return c.status


def documents_for(status: str, previously_carried: bool) -> bool | None:
    """Whether devices' documents must now carry the policy (None: nothing to publish)."""
    if status == "collecting":
        return True
    return False if previously_carried else None


def admits_chunks(c: Collection, device_id: str, now: float) -> bool:
    """A chunk is taken only for a collection whose policy went to that device and is not over."""
    return (c.status == "collecting" and device_id in c.devices and (not c.closes_at or now < c.closes_at))
