"""A fleet database: its engine, its transactions and paged reads, on SQLite or PostgreSQL.

`Database` is the base every store of the fleet opens (the fleet store, telemetry, alerts,
director sequences): a location (file path or `postgresql://` URL), one group of tables of
`fleet.db.schema` migrated to head at open (`fleet.db.migrate`), and `tx()` / `read()`.

Transactions: the connection of the current `tx()` or `read()` is kept per thread, so a nested
call (a repository method inside a caller's `tx()`, a read inside a write) reuses it and a
nested `tx()` becomes a SAVEPOINT; the outermost block commits, any exception rolls back. On
SQLite one writer at a time is the file's rule anyway, so a process-wide lock serialises every
block (as the single shared connection did before) and a write starts `BEGIN IMMEDIATE`. On
PostgreSQL reads run concurrently on pooled connections; writers of one process are still
serialised by the lock, which keeps the read-check-write sequences of the repositories as
safe as on SQLite within a process (across processes, unique keys and row locks decide).

`FleetDatabase` is the fleet store (`fleet.db` on SQLite): timestamps are ISO-8601 UTC strings
from an injected clock, so tests control time. Repositories of the feature slices build on it;
it knows none of them (the `fleet.store.Store` facade puts them together).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from fleet.db import engine as engines
from fleet.db.migrate import upgrade
from fleet.db.paging import Page, decode_cursor, encode_cursor
from fleet.db.rows import Row, decode_row, iso
from fleet.db.session import Db
from fleet.errors import FleetMisuseError

Clock = Callable[[], float]
T = TypeVar("T")


class Database:
    """One group of tables (`group`, a key of `fleet.db.schema.GROUPS`) at `location`.

    Raises FleetMisuseError when the location cannot be opened or migrated (not a SQLite file,
    PostgreSQL unreachable or refusing, bad URL); the message names `what` and never the
    password.
    """

    def __init__(self, location: Path | str, group: str, what: str, *, busy_timeout_ms: int = 5000,
                 foreign_keys: bool = False, synchronous_full: bool = False,
                 secure_delete: bool = False) -> None:
        self.location = location
        self.path = Path(location) if not engines.is_url(location) else None
        self._lock = threading.RLock()
        self._local = threading.local()
        self._closed = False
        self.what = what
        shown = engines.redact(location)
        try:
            self.engine = engines.create(location, busy_timeout_ms=busy_timeout_ms, foreign_keys=foreign_keys,
                                         synchronous_full=synchronous_full, secure_delete=secure_delete)
        except (ValueError, sa.exc.ArgumentError) as exc:
            raise FleetMisuseError(f"cannot open {what} {shown}: {exc}") from None
        self.dialect = str(self.engine.dialect.name)
        self._serial = self.dialect == "sqlite"
        try:
            with self.tx() as db:
                self.applied_migrations = upgrade(db.conn, group)
        except sa.exc.SQLAlchemyError as exc:
            self.engine.dispose()
            raise FleetMisuseError(f"cannot open {what} {shown}: {_reason(exc)}") from None

    @contextmanager
    def tx(self) -> Iterator[Db]:
        """A write transaction (nested calls become savepoints); rolls back on any exception."""
        current: Db | None = getattr(self._local, "db", None)
        if current is not None:
            with self._lock, current.conn.begin_nested():
                yield current
            return
        with self._lock, self._connection(write=True) as db:
            yield db

    @contextmanager
    def read(self) -> Iterator[Db]:
        """Reads (inside a `tx()` of this thread: on its connection, seeing its changes)."""
        current: Db | None = getattr(self._local, "db", None)
        if current is not None:
            yield current
            return
        if self._serial:
            with self._lock, self._connection(write=False) as db:
                yield db
        else:
            with self._connection(write=False) as db:
                yield db

    @contextmanager
    def _connection(self, write: bool) -> Iterator[Db]:
        if self._closed:
            raise FleetMisuseError(f"the {self.what} is closed")
        conn = self.engine.connect()
        if write:
            conn = conn.execution_options(**{engines.IMMEDIATE: True})
        db = Db(conn)
        self._local.db = db
        try:
            with conn.begin():
                yield db
        finally:
            self._local.db = None
            conn.close()

    def checkpoint(self) -> None:
        """SQLite: copy the WAL into the file and truncate it, so nothing freed lingers in the WAL
        (outside any transaction, as the pragma needs). Nothing to do on PostgreSQL."""
        if self.dialect != "sqlite":
            return
        with self._lock, self.engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Release every connection; the database refuses use afterwards (as a closed SQLite
        connection did), instead of quietly reconnecting."""
        self._closed = True
        self.engine.dispose()


class FleetDatabase(Database):
    """Open (creating and migrating as needed) the fleet store at `location` (a SQLite file path
    or a `postgresql://` URL). Raises FleetMisuseError if it cannot be opened."""

    def __init__(self, location: Path | str, clock: Clock = time.time, busy_timeout_ms: int = 5000) -> None:
        self.clock = clock
        super().__init__(location, "store", "fleet database", busy_timeout_ms=busy_timeout_ms,
                         foreign_keys=True, synchronous_full=True, secure_delete=True)

    def now(self) -> str:
        return iso(self.clock())

    def pragma(self, name: str) -> Any:
        """A SQLite pragma's value (tests and diagnostics; None on PostgreSQL)."""
        if self.dialect != "sqlite":
            return None
        with self.read() as db:
            return db.scalar(f"PRAGMA {name}")

    def page_of(
        self,
        sql: str,
        params: Mapping[str, Any],
        key: str,
        cursor: str | None,
        limit: int,
        record: Callable[[Row], T],
        descending: bool = False,
    ) -> Page[T]:
        """Keyset pagination over `sql` (a SELECT with a WHERE clause, named binds) ordered by
        unique `key`, each row made into `record(row)`."""
        params = dict(params)
        op, order = ("<", "DESC") if descending else (">", "ASC")
        if cursor is not None:
            sql += f" AND {key} {op} :page_after"
            params["page_after"] = decode_cursor(cursor)
        sql += f" ORDER BY {key} {order} LIMIT :page_limit"
        params["page_limit"] = limit + 1
        with self.read() as db:
            rows = db.query(sql, params)
        shown = rows[:limit]
        nxt = encode_cursor(shown[-1][key]) if len(rows) > limit and shown else None
        return Page([record(r) for r in shown], nxt)

    def page(
        self,
        sql: str,
        params: Mapping[str, Any],
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


def _reason(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's first line, without the SQL statement or its parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
