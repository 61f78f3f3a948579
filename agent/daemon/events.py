"""A small persistent outbox for the agent's events (rolled_back, committed, refused, ...).

Why on disk: the events that matter most (a rollback and its reason, a crash recovery) often
happen exactly when the device is offline or about to die, and the fleet gates rollouts on
them. Reported state is retained and re-sent on every connect, so it needs no queue; events
do. Encoded events go into SQLite (stdlib `sqlite3`, WAL, one statement per operation) and are
sent oldest first when connected. `synchronous=FULL` makes every stored event durable when its
statement returns: with WAL, NORMAL keeps the database consistent but a power cut may take
back the last commits, exactly the rollback or crash report written just before it. The
outbox is bounded: past `max_events` the oldest are dropped and the drop is logged (events
carry their own sequence numbers, so the fleet sees the gap).

Delivery is at least once, across crashes too: an event leaves the outbox when the broker has
acknowledged it (QoS 1 PUBACK), not when the MQTT client has queued it. `drain` hands stored
events to `send` and keeps each one's `Delivery` handle in memory; a later `drain` (the daemon
drains every `report_interval_s` and after each new event) deletes those whose PUBACK came. An
event handed over and not yet acknowledged is not handed over again by this process: paho
itself sends it again after a reconnect, under the same handle. After a restart every stored
event is sent again, including ones the broker got but whose PUBACK never reached the agent;
the fleet drops such duplicates by (device_id, seq). Nothing here waits for an acknowledgement
except `wait_acknowledged`, which must not run on the MQTT client's network thread (the
acknowledgements arrive there; the daemon calls it only on shutdown, from its main thread).

Errors: the constructor raises `agent.errors.MisuseError` when the file is not a usable database.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.contract.protocol import Event, encode_event
from agent.durable_io import fsync_dir
from agent.errors import MisuseError
from agent.logs import log_event
from agent.transport import Delivery

if TYPE_CHECKING:
    from agent.serving.model_holder import ShadowReport

log = logging.getLogger(__name__)


class EventOutbox:
    """Bounded FIFO of encoded events that survives restarts until acknowledged; thread-safe."""

    def __init__(self, path: Path, max_events: int = 1000) -> None:
        if max_events < 1:
            raise MisuseError("event outbox: max_events must be >= 1")
        self.path = Path(path)
        self.max_events = max_events
        self._lock = threading.Lock()
        self._in_flight: dict[int, Delivery] = {}  # row id -> handle of the publish not yet acked
        self._unstored: deque[bytes] = deque(maxlen=max_events)  # refused by the database (see `put`)
        # False once a drain found nothing left to hand over; `put` sets it again. An idle
        # agent drains every `report_interval_s`: this keeps those drains off the database.
        self._maybe_unsent = True
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)"
            )
            fsync_dir(self.path.parent)  # SQLite does not fsync the directory of a new database
        except (sqlite3.DatabaseError, OSError) as exc:
            raise MisuseError(f"event outbox: cannot open {self.path}: {exc}") from None

    def put(self, payload: bytes) -> None:
        """Store one encoded event, dropping the oldest (sent or not) past the bound.

        When the database refuses the write (typically a full disk: exactly when the event
        says an update failed), the event is kept in memory, stored at a later drain if it
        can be, and otherwise sent from memory (not durable until then).
        """
        with self._lock:
            if self._unstored or not self._insert(payload):
                self._unstored.append(payload)
                return
            self._maybe_unsent = True
            self._enforce_bound()

    def _insert(self, payload: bytes) -> bool:
        try:
            self._db.execute("INSERT INTO events (payload) VALUES (?)", (payload,))
        except sqlite3.Error as exc:  # disk full, I/O error: keep it in memory (see `put`)
            log_event(log, "agent.event_not_stored", logging.WARNING, error=str(exc))
            return False
        return True

    def _enforce_bound(self) -> None:
        row = self._db.execute(
            "SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?", (self.max_events,)
        ).fetchone()
        if row is None:
            return
        try:
            cur = self._db.execute("DELETE FROM events WHERE id <= ?", (row[0],))
        except sqlite3.Error as exc:  # retried at the next put
            log_event(log, "agent.events_bound_failed", logging.WARNING, error=str(exc))
            return
        for row_id in [i for i in self._in_flight if i <= row[0]]:
            del self._in_flight[row_id]
        log_event(log, "agent.events_dropped", logging.WARNING, dropped=cur.rowcount)

    def drain(self, send: Callable[[bytes], Delivery | None]) -> int:
        """Forget the events the broker acknowledged, then hand the others to `send`, oldest first.

        `send` publishes one event and returns its `Delivery`, or None when it cannot send now
        (offline); draining stops there, which keeps the order. Events already handed over and
        awaiting their PUBACK are skipped. Returns how many events were handed over.
        """
        handed = 0
        with self._lock:  # one drainer at a time keeps the order
            self._forget_acknowledged()
            if self._unstored and self._insert(self._unstored[0]):  # room again: make them durable
                self._unstored.popleft()
                while self._unstored and self._insert(self._unstored[0]):
                    self._unstored.popleft()
                self._maybe_unsent = True
                self._enforce_bound()
            if not self._maybe_unsent and not self._unstored:
                return 0
            ids = [int(r[0]) for r in self._db.execute("SELECT id FROM events ORDER BY id")]
            unsent = [i for i in ids if i not in self._in_flight]
            for row_id in unsent:
                (payload,) = self._db.execute("SELECT payload FROM events WHERE id = ?", (row_id,)).fetchone()
                delivery = send(bytes(payload))
                if delivery is None:
                    return handed
                self._in_flight[row_id] = delivery
                handed += 1
            self._maybe_unsent = False  # every stored event is in flight (or acknowledged)
            while self._unstored:  # still not storable: send from memory, after the stored ones
                if send(self._unstored[0]) is None:
                    return handed
                self._unstored.popleft()
                handed += 1
        return handed

    def wait_acknowledged(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every handed-over event's PUBACK, forgetting them as they come.

        True when none is left in flight. Never call it on the MQTT client's network thread.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._forget_acknowledged()
                if not self._in_flight:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _forget_acknowledged(self) -> None:
        """Delete acknowledged events (caller holds the lock)."""
        done: list[int] = []
        for row_id, delivery in list(self._in_flight.items()):
            try:
                acked = delivery.is_published()
            except (ValueError, RuntimeError):  # the client will never send it: hand it over again
                del self._in_flight[row_id]
                self._maybe_unsent = True
                continue
            if acked:
                done.append(row_id)
        if done:
            self._db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in done])
            for row_id in done:
                del self._in_flight[row_id]

    @property
    def in_flight(self) -> int:
        """Events handed to the transport whose PUBACK has not been seen yet."""
        with self._lock:
            return len(self._in_flight)

    def __len__(self) -> int:
        """Stored events: not yet sent, or sent and not yet known to be acknowledged."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        """Close the database; events not acknowledged stay in it and are sent at the next start."""
        with self._lock:
            self._in_flight.clear()
            self._db.close()


# --- what goes into an event ------------------------------------------------------------------
_EVENT_NAMES = {"staged": "installed"}  # lifecycle report name -> wire event type
_MAX_REASON = 2048  # the protocol's bounds (`agent.contract.protocol.Event`)
_MAX_MEASUREMENTS = 64


def lifecycle_event(name: str, fields: dict[str, Any], previous_active: str | None) -> dict[str, Any]:
    """A lifecycle report (`Lifecycle.emit`) as keyword arguments for an event.

    Numeric fields become measurements (booleans as 0/1); `previous_active` is the bundle an
    activation replaced, used when the report does not name one.
    """
    measurements = {
        k: float(v) for k, v in (fields.get("measurements") or {}).items() if isinstance(v, int | float)
    }
    for key in ("sequence", "quarantined_at_sequence"):
        if isinstance(fields.get(key), int | float):
            measurements[key] = float(fields[key])
    if isinstance(fields.get("swapped"), bool):
        measurements["swapped"] = float(fields["swapped"])
    return {
        "kind": _EVENT_NAMES.get(name, name),
        "bundle_id": fields.get("bundle"),
        "previous_bundle_id": fields.get("previous") or previous_active,
        "reason": str(fields.get("reason") or ""),
        "measurements": measurements,
    }


def shadow_measurements(rep: ShadowReport) -> dict[str, float]:
    """The numeric fields of a shadow report (agreement, distance, latency, counts)."""
    fields = {
        "offered": rep.offered,
        "compared": rep.compared,
        "dropped": rep.dropped,
        "errors": rep.errors,
        "label_agreement": rep.label_agreement,
        "mean_abs_diff": rep.mean_abs_diff,
        "latency_p50_ms": rep.latency_p50_ms,
        "latency_p95_ms": rep.latency_p95_ms,
    }
    return {k: float(v) for k, v in fields.items() if v is not None}


def encode_event_bounded(
    device_id: str,
    kind: str,
    seq: int,
    bundle_id: str | None = None,
    previous_bundle_id: str | None = None,
    reason: str = "",
    measurements: dict[str, float] | None = None,
) -> bytes:
    """An event's wire bytes, its reason and measurements cut to the protocol's bounds.

    Cutting instead of refusing: an event about a failure must be sent even when the failure's
    message is long. A bad `kind` or `device_id` (a bug) raises `ValidationError`
    (`agent.contract.strict`), an event over `MAX_CONTROL_MESSAGE` raises `MisuseError`.
    """
    msg = Event(
        device_id=device_id,
        type=kind,
        bundle_id=bundle_id,
        previous_bundle_id=previous_bundle_id,
        reason=reason[:_MAX_REASON],
        measurements=dict(list((measurements or {}).items())[:_MAX_MEASUREMENTS]),
        timestamp=time.time(),
        seq=seq,
    )
    return encode_event(msg)
