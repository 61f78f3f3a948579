"""`DeviceEventIntake`: folds the device events that arrived since the last tick into outcomes.

Kept apart from `fleet.rollouts.controller` because events come two ways and both must be
applied the same: in one process they are queued in memory by the publisher callback (`queue`);
with several fleet processes (docs/scaling.md) they come from the database (`EventLog`, written
by whichever ingest worker got them) and are applied and marked handled in one transaction under
the leader's fencing token, so a restart or a new leader neither loses nor repeats one. The
per-event verdict is the pure `fleet.rollouts.device_verdicts.event_update`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager

from agent.contract.protocol import Event
from agent.logs import log_event
from fleet.cluster.lease import LeaseLost
from fleet.delivery.event_log import EventLog
from fleet.errors import FleetError
from fleet.rollouts.controller_ports import Leadership
from fleet.rollouts.device_verdicts import event_update
from fleet.rollouts.record_types import OpenEntry, RuntimePhase
from fleet.rollouts.records import RolloutRecords

logger = logging.getLogger("edgefleet.fleet.rollouts")
# Stored device events applied per transaction. The transaction holds the lease row FOR SHARE on
# PostgreSQL (the fence), which also holds off the elector's own renewal: 5,000 events a batch
# took longer than the lease TTL there (about 20 s on a loaded 2-core machine), so the lease
# lapsed inside every batch, the final fence raised LeaseLost, the batch rolled back and the
# next tick began the same batch again (fleet_scale with 10,000 devices never finished).
EVENT_BATCH = 500


class DeviceEventIntake:
    """Queued (in-process) and stored (`event_log`) device events, applied to open rollout entries."""

    def __init__(self, records: RolloutRecords, leadership: Leadership, event_log: EventLog | None,
                 clock_skew_s: float, max_events: int,
                 tx: Callable[[], AbstractContextManager[None]]) -> None:
        self.records = records
        self.leadership = leadership
        self.event_log = event_log  # None: events arrive through `queue` (one process)
        self.clock_skew_s = clock_skew_s
        self._events: deque[tuple[str, Event]] = deque(maxlen=max_events)
        self._tx = tx

    def queue(self, device_id: str, event: Event) -> None:
        """Hold an event for the next tick (any thread; the oldest go first past `max_events`)."""
        self._events.append((device_id, event))

    def apply(self) -> None:
        """Apply the queued events, then the stored ones batch by batch (fenced; `LeaseLost` raises)."""
        while self._events:
            dev, ev = self._events.popleft()
            for e in self.records.open_entries_for(dev):
                self._apply_event(e, dev, ev)
        if self.event_log is None:
            return
        while batch := self.event_log.open_events(EVENT_BATCH):
            with self._tx():  # applied and marked handled together, under the fencing token
                for stored in batch:
                    try:
                        for e in self.records.open_entries_for(stored.device_id):
                            self._apply_event(e, stored.device_id, stored.event)
                    except LeaseLost:
                        raise
                    except FleetError as exc:  # one bad event must not hold back every later one
                        log_event(logger, "rollout.event_failed", logging.WARNING, device=stored.device_id,
                                  seq=stored.seq, error=str(exc))
                self.event_log.mark_handled(((s.device_id, s.seq) for s in batch), self.leadership.fence())

    def _apply_event(self, e: OpenEntry, dev: str, ev: Event) -> None:
        if e.phase is not RuntimePhase.ROLLBACK and ev.type == "shadow_report" \
                and "label_agreement" in ev.measurements:
            n = max(1.0, ev.measurements.get("compared", 1.0))
            self.records.add_shadow_agreement(e.rollout_id, ev.measurements["label_agreement"], n)
            return
        update = event_update(e, ev, self.clock_skew_s)
        if update is not None:
            self.records.update_device(e.rollout_id, dev, update.status, **update.fields)
