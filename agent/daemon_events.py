"""A small persistent outbox for the agent's events (rolled_back, committed, refused, ...).

Why on disk: the events that matter most (a rollback and its reason, a crash recovery) often
happen exactly when the device is offline or about to die, and the fleet gates rollouts on
them. Reported state is retained and re-sent on every connect, so it needs no queue; events
do. Encoded events go into SQLite (stdlib `sqlite3`, WAL, one statement per operation) and are
sent oldest first when connected, then deleted. The outbox is bounded: past `max_events` the
oldest are dropped and the drop is logged (events carry their own sequence numbers, so the
fleet sees the gap).

Errors: the constructor raises `agent.errors.MisuseError` when the file is not a usable database.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from agent.errors import MisuseError
from agent.logs import log_event

log = logging.getLogger(__name__)


class EventOutbox:
    """Bounded FIFO of encoded events that survives restarts; thread-safe."""

    def __init__(self, path: Path, max_events: int = 1000) -> None:
        if max_events < 1:
            raise MisuseError("event outbox: max_events must be >= 1")
        self.path = Path(path)
        self.max_events = max_events
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)"
            )
        except sqlite3.DatabaseError as exc:
            raise MisuseError(f"event outbox: cannot open {self.path}: {exc}") from None

    def put(self, payload: bytes) -> None:
        """Store one encoded event, dropping the oldest past the bound."""
        with self._lock:
            self._db.execute("INSERT INTO events (payload) VALUES (?)", (payload,))
            cur = self._db.execute(
                "DELETE FROM events WHERE id NOT IN (SELECT id FROM events ORDER BY id DESC LIMIT ?)",
                (self.max_events,),
            )
            if cur.rowcount:
                log_event(log, "agent.events_dropped", logging.WARNING, dropped=cur.rowcount)

    def drain(self, send: Callable[[bytes], bool]) -> int:
        """Send stored events oldest first until `send` returns False; returns how many were sent."""
        sent = 0
        with self._lock:  # one drainer at a time keeps the order
            rows = self._db.execute("SELECT id, payload FROM events ORDER BY id").fetchall()
            for row_id, payload in rows:
                if not send(bytes(payload)):
                    break
                self._db.execute("DELETE FROM events WHERE id = ?", (row_id,))
                sent += 1
        return sent

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
