"""Device events stored once per (device, seq) in the fleet database, applied once by the leader.

Why in the database: with several ingest workers on a shared subscription, a redelivered event
(the agent resends what the broker got but never acknowledged, `agent.daemon.events`) may reach
another worker than the first copy did, and the rollout controller that applies it may run in
yet another process. The primary key (device_id, seq) makes the first INSERT win whichever
worker races (`INSERT ... ON CONFLICT DO NOTHING`, portable to PostgreSQL), and the controller
marks each row handled, with its fencing token, in the transaction that applies it
(`fleet.rollouts.controller`), so a restart or a new leader neither loses nor repeats one.
An ingest worker stores events from its events stream (`fleet/delivery/event_stream.py`) through
an `EventBatch`, one transaction per flush, acknowledged after it commits; `DurableEvents` stores
one at a time for publisher callbacks. `fleet.delivery.dedupe.EventDeduper` stays as the
in-memory filter of a single process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.contract.protocol import Event, decode_event, encode_event
from agent.errors import MessageError
from agent.logs import log_event
from fleet.db.database import FleetDatabase

logger = logging.getLogger(__name__)
RETENTION_S = 14 * 24 * 3600.0
PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True, slots=True)
class StoredEvent:
    device_id: str
    seq: int
    event: Event


class EventLog:
    """The `device_events` table: `record` from ingest workers, `open_events` / `mark_handled`
    from the leader controller. Thread-safe (the database's lock)."""

    def __init__(self, database: FleetDatabase, clock: Callable[[], float] = time.time) -> None:
        self.database = database
        self.clock = clock
        self.duplicates = 0
        self._pruned_at: float | None = None

    def record(self, device_id: str, event: Event) -> bool:
        """Store the event; False when (device, seq) is already stored (a redelivery)."""
        return self.record_many([(device_id, event)]) == 1

    def record_many(self, events: Sequence[tuple[str, Event]]) -> int:
        """Store `events` in one transaction (all or none: raises what the database raises);
        returns how many were new, the others being stored already (redeliveries)."""
        new = 0
        at = self.clock()
        with self.database.tx() as db:
            for device_id, event in events:  # one statement each: its rowcount says new or not
                cur = db.execute(
                    "INSERT INTO device_events (device_id, seq, payload, received_at) "
                    "VALUES (:device, :seq, :payload, :at) ON CONFLICT (device_id, seq) DO NOTHING",
                    {"device": device_id, "seq": event.seq, "payload": encode_event(event), "at": at})
                new += cur.rowcount == 1
        self.duplicates += len(events) - new
        if new < len(events):
            log_event(logger, "fleet.event_duplicate", logging.DEBUG, duplicates=len(events) - new)
        return new

    def open_events(self, limit: int = 5000) -> list[StoredEvent]:
        """Events not yet handled, each device's in sequence order."""
        with self.database.read() as db:
            rows = db.execute("SELECT device_id, seq, payload FROM device_events WHERE handled_at IS NULL "
                              "ORDER BY received_at, device_id, seq LIMIT :limit",
                              {"limit": limit}).fetchall()
        out = []
        for dev, seq, payload in rows:
            try:
                out.append(StoredEvent(dev, int(seq), decode_event(bytes(payload), dev)))
            except MessageError as exc:  # validated at ingest; a row edited by hand is skipped
                log_event(logger, "fleet.event_undecodable", logging.WARNING, device=dev, seq=seq,
                          error=str(exc))
                self.mark_handled([(dev, int(seq))], token=-1)
        return out

    def mark_handled(self, keys: Iterable[tuple[str, int]], token: int) -> None:
        """Mark events applied by the leader holding `token` (call in the applying transaction)."""
        now = self.clock()
        with self.database.tx() as db:
            params = [{"now": now, "token": token, "device": d, "seq": s} for d, s in keys]
            if params:
                db.execute("UPDATE device_events SET handled_at = :now, handled_token = :token "
                           "WHERE device_id = :device AND seq = :seq AND handled_at IS NULL", params)
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            self.prune()

    def prune(self, retention_s: float = RETENTION_S) -> int:
        """Forget handled events older than `retention_s` (an older redelivery then passes again)."""
        with self.database.tx() as db:
            cur = db.execute("DELETE FROM device_events WHERE handled_at IS NOT NULL "
                             "AND received_at < :cutoff",
                             {"cutoff": self.clock() - retention_s})
            return int(cur.rowcount)


class DurableEvents:
    """Publisher event callback: store each event once, then `wake()` (the in-process controller)."""

    def __init__(self, log: EventLog, wake: Callable[[], None] | None = None) -> None:
        self.log = log
        self.wake = wake

    def __call__(self, device_id: str, event: Event) -> None:
        if self.log.record(device_id, event) and self.wake is not None:
            self.wake()


class EventBatch:
    """The events stream's buffer (`fleet/delivery/event_stream.py`): `add` holds an event, `flush`
    stores every held one in one transaction and then `wake()`s the in-process controller. A
    failed flush raises and keeps them, so the stream acknowledges nothing and retries."""

    def __init__(self, log: EventLog, wake: Callable[[], None] | None = None) -> None:
        self.log = log
        self.wake = wake
        self._held: list[tuple[str, Event]] = []

    def add(self, device_id: str, event: Event) -> None:
        self._held.append((device_id, event))

    def flush(self) -> int:
        """Store the held events; returns how many were new."""
        if not self._held:
            return 0
        new = self.log.record_many(self._held)
        self._held = []
        if new and self.wake is not None:
            self.wake()
        return new
