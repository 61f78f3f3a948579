"""How a database location becomes an SQLAlchemy engine, so connection settings live in one place.

A location is a SQLite file path (the embedded default) or a `postgresql://` URL. SQLite runs
through `sqlite+pysqlite` with the pragmas applied on every new connection (a `connect`
event): WAL so readers never wait for the writer, `busy_timeout` so another process's write
lock is waited for, and, where the owner asks, foreign keys, `synchronous = FULL` (a committed
change survives power loss) and `secure_delete` (a scrubbed secret does not linger in free
pages). The file is made 0600 (parents 0700) before SQLite opens it (`fleet.db.files`).
pysqlite's own transaction handling is switched off and `BEGIN` (or `BEGIN IMMEDIATE` for a
write transaction, so a writer takes the lock up front instead of failing to upgrade) is
emitted by SQLAlchemy's `begin` event: this is SQLAlchemy's documented recipe that makes
SAVEPOINTs work on pysqlite.

PostgreSQL runs through `postgresql+psycopg` (psycopg 3) with SQLAlchemy's `QueuePool`, not
`psycopg_pool`: the pool SQLAlchemy manages is the one its `Connection`s, pre-ping and
dispose already use on both dialects, so the fleet has one pooling path and one set of knobs;
psycopg_pool would only add a second pool under it (SQLAlchemy would wrap it with NullPool)
without a feature the fleet needs (its async and background-refill strengths are unused by
sync repositories). Pre-ping drops connections PostgreSQL closed (a restart, idle timeout).

`redact` is the only way a URL reaches a log or an error message: the password never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from fleet.db.files import secure_file

DEFAULT_BUSY_TIMEOUT_MS = 10_000
POOL_SIZE = 5
POOL_OVERFLOW = 10
IMMEDIATE = "fleet_sqlite_immediate"  # execution option: this transaction writes (BEGIN IMMEDIATE)


def is_url(location: Path | str) -> bool:
    """Whether `location` is a database URL (anything with a scheme) rather than a file path."""
    return isinstance(location, str) and "://" in location


def to_url(location: Path | str) -> URL:
    """The SQLAlchemy URL of a file path or of a `postgresql://` URL (driver forced to psycopg 3)."""
    if not is_url(location):
        return URL.create("sqlite+pysqlite", database=str(location))
    url = sa.make_url(str(location))
    if url.get_backend_name() == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite+pysqlite")
    raise ValueError(f"unsupported database URL scheme {url.drivername!r} (postgresql:// or a file path)")


def redact(location: Path | str | URL) -> str:
    """A location fit for logs: a URL with its password masked, a path as is."""
    if isinstance(location, URL):
        return location.render_as_string(hide_password=True)
    if is_url(location):
        try:
            return sa.make_url(str(location)).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            return "<unparseable database URL>"
    return str(location)


def create(
    location: Path | str,
    *,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    foreign_keys: bool = False,
    synchronous_full: bool = False,
    secure_delete: bool = False,
) -> Engine:
    """An engine for `location`. Raises ValueError for an unsupported URL, FleetMisuseError
    when a SQLite file's mode cannot be set. Nothing connects yet."""
    url = to_url(location)
    if url.get_backend_name() == "postgresql":
        return sa.create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_pre_ping=True,
                                hide_parameters=True)
    if url.database not in (None, "", ":memory:"):
        secure_file(url.database)
    engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000,
                                                 "check_same_thread": False},
                              hide_parameters=True)
    pragmas = [f"PRAGMA busy_timeout = {int(busy_timeout_ms)}"]
    if foreign_keys:
        pragmas.append("PRAGMA foreign_keys = ON")
    if secure_delete:
        pragmas.append("PRAGMA secure_delete = ON")
    pragmas.append("PRAGMA journal_mode = WAL")
    if synchronous_full:
        pragmas.append("PRAGMA synchronous = FULL")

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        try:
            for pragma in pragmas:
                cur.execute(pragma)
        finally:
            cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(IMMEDIATE) else "BEGIN")

    return engine


def autocommit_engine(url: URL, *, pool_size: int = 2, max_overflow: int = 4) -> Engine:
    """PostgreSQL: a small pool of autocommit connections with `synchronous_commit = off`, for
    single statements that need neither a transaction nor to wait for the WAL flush (the
    report-counter claims, fleet/devices/report_keys.py). Nothing connects yet."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_size=pool_size,
                              max_overflow=max_overflow, hide_parameters=True)

    @sa.event.listens_for(engine, "connect")
    def _synchronous_commit_off(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SET synchronous_commit = off")
        finally:
            cur.close()
        dbapi_conn.commit()

    return engine
