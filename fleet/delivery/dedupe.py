"""Drop events a device sent twice: agents deliver events at least once.

Why: an agent deletes an event from its on-disk outbox only after the broker's PUBACK
(`agent.daemon.events`), so an event the broker got but whose PUBACK never reached the agent
(connection lost, agent killed, power loss) is sent again after the reconnect or restart, with
the same `seq` (docs/protocol.md, "Events"). Most of the fleet's reactions are idempotent
(a device marked rolled back twice is still rolled back), but counts and averages are not
(`shadow_report` agreement, refused-document counts), so duplicates are dropped here, by
(device_id, seq), before any callback sees them.

Memory is bounded: the most recent `capacity` pairs are remembered (~200 bytes each), which
covers redeliveries minutes to hours apart in a large fleet; an older duplicate passes, and the
callbacks behind it must stay tolerant of that. Nothing is persisted: after a fleet restart
the in-memory consumers start afresh anyway.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable

from agent.contract.protocol import Event
from agent.logs import log_event

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 100_000


class EventDeduper:
    """Publisher event callback wrapper: passes each (device_id, seq) on once; thread-safe."""

    def __init__(self, callback: Callable[[str, Event], None], capacity: int = DEFAULT_CAPACITY) -> None:
        """Raises `ValueError` when `capacity` < 1."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.callback = callback
        self.capacity = capacity
        self.duplicates = 0  # events dropped as already seen
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, device_id: str, event: Event) -> None:
        key = (sys.intern(device_id), event.seq)
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                self.duplicates += 1
                duplicate = True
            else:
                self._seen[key] = None
                if len(self._seen) > self.capacity:
                    self._seen.popitem(last=False)
                duplicate = False
        if duplicate:
            log_event(logger, "fleet.event_duplicate", logging.DEBUG, device=device_id, seq=event.seq,
                      type=event.type)
            return
        self.callback(device_id, event)
