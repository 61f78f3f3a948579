"""The fleet database file: one shared connection, its lock, transactions and paged reads.

One connection is shared by all threads behind an `RLock`: FastAPI runs sync routes in a
thread pool, SQLite serialises writers anyway, and a single connection keeps every
transaction (change + audit row) atomic. Opening migrates the schema (`fleet.db.migrations`)
so the code and the file always agree. Timestamps are ISO-8601 UTC strings from an injected
clock, so tests control time. Repositories of the feature slices build on this class; it
knows none of them (the `fleet.store.Store` facade puts them together).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from fleet.db.connection import open_sqlite
from fleet.db.migrations import migrate
from fleet.db.paging import Page, decode_cursor, encode_cursor
from fleet.db.rows import Row, decode_row, iso
from fleet.errors import FleetMisuseError

Clock = Callable[[], float]
T = TypeVar("T")


class FleetDatabase:
    """Open (creating and migrating as needed) the fleet database at `path`.

    Raises FleetMisuseError if the file cannot be opened as a SQLite database.
    """

    def __init__(self, path: Path | str, clock: Clock = time.time, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.RLock()
        try:
            self.db = sqlite_utils.Database(open_sqlite(
                self.path, busy_timeout_ms=busy_timeout_ms, foreign_keys=True, synchronous_full=True,
                secure_delete=True))
            self.applied_migrations = migrate(self.db)
        except sqlite3.DatabaseError as exc:
            raise FleetMisuseError(f"cannot open fleet database {self.path}: {exc}") from exc

    def now(self) -> str:
        return iso(self.clock())

    @contextmanager
    def tx(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction (nested calls become savepoints); rolls back on any exception.

        The outermost one is `BEGIN IMMEDIATE`: with several fleet processes on one file
        (docs/scaling.md), a deferred transaction that read first and then writes fails at
        once with "database is locked" when another process wrote meanwhile; an immediate
        one waits for the write lock (busy timeout) before it reads anything."""
        with self._lock:
            if self.db.conn.in_transaction:
                with self.db.atomic():
                    yield self.db
                return
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                if self.db.conn.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

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

    def page_of(
        self,
        sql: str,
        params: list[Any],
        key: str,
        cursor: str | None,
        limit: int,
        record: Callable[[Row], T],
        descending: bool = False,
    ) -> Page[T]:
        """Keyset pagination over `sql` (a SELECT with a WHERE clause) ordered by unique `key`,
        each row made into `record(row)`."""
        params = list(params)
        op, order = ("<", "DESC") if descending else (">", "ASC")
        if cursor is not None:
            sql += f" AND {key} {op} ?"
            params.append(decode_cursor(cursor))
        sql += f" ORDER BY {key} {order} LIMIT ?"
        params.append(limit + 1)
        with self.read() as db:
            rows = list(db.query(sql, params))
        shown = rows[:limit]
        nxt = encode_cursor(shown[-1][key]) if len(rows) > limit and shown else None
        return Page([record(r) for r in shown], nxt)

    def page(
        self,
        sql: str,
        params: list[Any],
        key: str,
        cursor: str | None,
        limit: int,
        json_cols: tuple[str, ...] = (),
        descending: bool = False,
    ) -> Page[Row]:
        """`page_of` for tables still read as dict rows, with `json_cols` parsed."""
        return self.page_of(sql, params, key, cursor, limit, lambda r: _decoded(r, json_cols), descending)


def _decoded(row: Row, json_cols: tuple[str, ...]) -> Row:
    out = decode_row(row, json_cols)
    assert out is not None
    return out
