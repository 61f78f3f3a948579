"""The fleet's durable state: one SQLite file (WAL) reached through sqlite-utils.

`Store` owns the connection and hands out repository objects per resource
(`store.models`, `store.devices`, `store.access`, `store.rollouts`, `store.audit`,
`store.idempotency`). One connection is shared by all threads behind an `RLock`: FastAPI
runs sync routes in a thread pool, SQLite serialises writers anyway, and a single
connection keeps every transaction (change + audit row) atomic. Every write that an
operator causes records an audit row in the same transaction, so the log cannot miss
a change that committed. Timestamps are ISO-8601 UTC strings from an injected clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from fleet.db.files import secure_file
from fleet.db.migrations import migrate
from fleet.errors import FleetInputError, FleetMisuseError

Clock = Callable[[], float]
Row = dict[str, Any]


def iso(ts: float) -> str:
    """Seconds since the epoch as a sortable ISO-8601 UTC string (microseconds)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces) for storage and hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def decode_row(row: Row | None, json_cols: tuple[str, ...]) -> Row | None:
    """A row with its JSON text columns parsed (None stays None)."""
    if row is None:
        return None
    out = dict(row)
    for col in json_cols:
        if out.get(col) is not None:
            out[col] = json.loads(out[col])
    return out


@dataclass
class Page:
    """One page of a listing plus the opaque cursor of the next page (None at the end)."""

    items: list[Row] = field(default_factory=list)
    next_cursor: str | None = None


def encode_cursor(last_key: str | int) -> str:
    return base64.urlsafe_b64encode(json.dumps([last_key]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str | int:
    """Raises FleetInputError when the cursor was not made by `encode_cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise FleetInputError(f"cursor {cursor!r} is not a cursor this service issued") from exc
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | int)):
        raise FleetInputError(f"cursor {cursor!r} is not a cursor this service issued")
    return value[0]


class Store:
    """Open (creating and migrating as needed) the fleet database at `path`.

    Raises FleetMisuseError if the file cannot be opened as a SQLite database.
    """

    def __init__(self, path: Path | str, clock: Clock = time.time, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.clock = clock
        secure_file(self.path)  # 0600 (and so its WAL) whatever the umask; new parents 0700
        self._lock = threading.RLock()
        try:
            conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=busy_timeout_ms / 1000)
            self.db = sqlite_utils.Database(conn)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA secure_delete = ON")  # deleted rows are zeroed, not left in free pages
            self.db.enable_wal()
            # FULL: a committed change survives power loss too, not only a process crash.
            self.db.execute("PRAGMA synchronous = FULL")
            self.applied_migrations = migrate(self.db)
        except sqlite3.DatabaseError as exc:
            raise FleetMisuseError(f"cannot open fleet database {self.path}: {exc}") from exc
        # Imported here: the repositories import this module for helpers.
        from fleet.access.credentials import AccessRepo
        from fleet.devices.inventory import DeviceRepo
        from fleet.registry.versions import ModelRepo
        from fleet.rollouts.store import RolloutRepo

        self.audit = AuditRepo(self)
        self.idempotency = IdempotencyRepo(self)
        self.models = ModelRepo(self)
        self.devices = DeviceRepo(self)
        self.access = AccessRepo(self)
        self.rollouts = RolloutRepo(self)

    def now(self) -> str:
        return iso(self.clock())

    @contextmanager
    def tx(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction (nested calls become savepoints); rolls back on any exception."""
        with self._lock, self.db.atomic():
            yield self.db

    @contextmanager
    def read(self) -> Iterator[sqlite_utils.Database]:
        """Exclusive use of the shared connection for reads."""
        with self._lock:
            yield self.db

    def pragma(self, name: str) -> Any:
        with self.read() as db:
            return db.execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def page(
        self,
        sql: str,
        params: list[Any],
        key: str,
        cursor: str | None,
        limit: int,
        json_cols: tuple[str, ...] = (),
        descending: bool = False,
    ) -> Page:
        """Keyset pagination over `sql` (a SELECT with a WHERE clause) ordered by unique `key`."""
        params = list(params)
        op, order = ("<", "DESC") if descending else (">", "ASC")
        if cursor is not None:
            sql += f" AND {key} {op} ?"
            params.append(decode_cursor(cursor))
        sql += f" ORDER BY {key} {order} LIMIT ?"
        params.append(limit + 1)
        with self.read() as db:
            rows = [decode_row(r, json_cols) for r in db.query(sql, params)]
        items = [r for r in rows[:limit] if r is not None]
        nxt = encode_cursor(items[-1][key]) if len(rows) > limit and items else None
        return Page(items, nxt)


class AuditRepo:
    """Append-only record of every change: who, what, on which resource, before and after."""

    JSON = ("before", "after")

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, actor: str, action: str, resource: str, before: Any, after: Any) -> None:
        """Append one entry; call inside the transaction that made the change."""
        with self.store.tx() as db:
            db.table("audit_log").insert(
                {
                    "at": self.store.now(),
                    "actor": actor,
                    "action": action,
                    "resource": resource,
                    "before": None if before is None else dumps(before),
                    "after": None if after is None else dumps(after),
                }
            )

    def list(
        self,
        cursor: str | None,
        limit: int,
        resource: str | None = None,
        actor: str | None = None,
        action: str | None = None,
    ) -> Page:
        """Newest first, optionally filtered by exact resource, actor or action."""
        sql, params = "SELECT * FROM audit_log WHERE 1", []
        for col, val in (("resource", resource), ("actor", actor), ("action", action)):
            if val is not None:
                sql += f" AND {col} = ?"
                params.append(val)
        return self.store.page(sql, params, "id", cursor, limit, self.JSON, descending=True)


class IdempotencyRepo:
    """Stored first responses of create requests, keyed by (actor, Idempotency-Key).

    Never a secret: a replay record lives for `idempotency_ttl_seconds` in a file that backups
    copy, so the caller stores the response without its one-time key or token.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, actor: str, key: str) -> Row | None:
        with self.store.read() as db:
            rows = list(db.query("SELECT * FROM idempotency_keys WHERE actor = ? AND key = ?", [actor, key]))
        return decode_row(rows[0], ("response",)) if rows else None

    def save(self, actor: str, key: str, route: str, request_hash: str, status: int, response: Any) -> None:
        with self.store.tx() as db:
            db.table("idempotency_keys").insert(
                {
                    "actor": actor,
                    "key": key,
                    "route": route,
                    "request_hash": request_hash,
                    "status_code": status,
                    "response": dumps(response),
                    "created_at": self.store.now(),
                }
            )

    def scrub(self, is_secret: Callable[[Any], bool]) -> int:
        """Drop the top-level response fields `is_secret` flags from every stored record (rows an
        older version wrote with the plaintext in them); returns how many rows changed.

        The WAL is checkpointed and truncated afterwards (and `secure_delete` zeroes freed
        space), so the plaintext does not linger in the files either.
        """
        changed = 0
        with self.store.tx() as db:
            for row in list(db.query("SELECT actor, key, response FROM idempotency_keys")):
                response = json.loads(row["response"])
                if not isinstance(response, dict) or not any(map(is_secret, response.values())):
                    continue
                kept = {k: v for k, v in response.items() if not is_secret(v)}
                db.execute("UPDATE idempotency_keys SET response = ? WHERE actor = ? AND key = ?",
                           [dumps(kept), row["actor"], row["key"]])
                changed += 1
        if changed:
            with self.store.read() as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return changed

    def purge(self, older_than_seconds: float) -> int:
        """Forget keys older than the retention window; returns how many were removed."""
        cutoff = iso(self.store.clock() - older_than_seconds)
        with self.store.tx() as db:
            return int(db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", [cutoff]).rowcount)
