"""`--database URL` for the scale benchmarks: which database a benchmark's fleet runs on.

- no URL, or `sqlite:///path`: SQLite files (in the benchmark's temporary directory, or the
  given file for the fleet store);
- `postgresql://user@host:port` (no database name): the benchmark creates a scratch database
  per run on that server (`edgefleet_bench_<hex>`) and drops it `WITH (FORCE)` afterwards;
- `postgresql://user@host:port/NAME`: that database, which must exist and be empty (no table
  in its `public` schema; the benchmark refuses otherwise, so it never measures or wipes
  someone's data). Between and after runs the benchmark drops what it created (the `public`
  schema, recreated empty).

`scratch(bench)` is the context manager a run opens: it yields the location to hand to
`Store`, `TelemetryStore` and `fleet serve --database` (a SQLite path or a URL). The metric
names say which backend was measured (`_pg`, `_sqlite`). `probe_postgres()` tells whether a
server answers on 127.0.0.1:5432 (the default of `ingest_scale`).
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"


@dataclass(frozen=True)
class BenchDatabase:
    backend: str  # "sqlite" | "pg"
    path: Path | None  # the SQLite file (None: make one in the benchmark's temporary directory)
    url: str | None  # as given
    pg_database: str | None = None  # the named PostgreSQL database (None: scratch ones)

    @contextmanager
    def scratch(self, tmp: Path) -> Iterator[Path | str]:
        """The location of one run: a SQLite path under `tmp` (or the given file), or a
        PostgreSQL URL of a database that is empty now and cleaned up afterwards."""
        if self.backend == "sqlite":
            yield self.path or tmp / "fleet.db"
            return
        assert self.url is not None
        if self.pg_database is not None:
            _check_empty(self.url)
            try:
                yield self.url
            finally:
                _wipe(self.url)
            return
        name = f"edgefleet_bench_{secrets.token_hex(5)}"
        with _admin(self.url) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _with_database(self.url, name)
        finally:
            with _admin(self.url) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def parse_database(url: str | None) -> BenchDatabase:
    """`sqlite:///abs/path`, `postgresql://...` or None; raises SystemExit with a sentence."""
    if url is None:
        return BenchDatabase("sqlite", None, None)
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return BenchDatabase("sqlite", Path(parts.path) if parts.path else None, url)
    if parts.scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        name = parts.path.lstrip("/") or None
        try:
            with _admin(url):
                pass
        except psycopg.Error as exc:
            raise SystemExit(f"--database {_shown(url)}: PostgreSQL does not answer "
                             f"({_first_line(exc)})") from None
        return BenchDatabase("pg", None, url, name)
    raise SystemExit(f"--database {url!r}: give sqlite:///path or postgresql://user@host:port[/db]")


def probe_postgres(host: str = "127.0.0.1", port: int = 5432) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _libpq(url: str, dbname: str | None = None) -> str:
    """A libpq URL (psycopg's own scheme, no SQLAlchemy driver suffix), optionally another database."""
    parts = urlsplit(url)
    path = f"/{dbname}" if dbname is not None else parts.path
    return urlunsplit(("postgresql", parts.netloc, path, parts.query, ""))


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, ""))


def _admin(url: str) -> psycopg.Connection:
    """Autocommit connection to the URL's database, or to `postgres` when it names none."""
    name = urlsplit(url).path.lstrip("/") or "postgres"
    return psycopg.connect(_libpq(url, name), autocommit=True, connect_timeout=5)


def _check_empty(url: str) -> None:
    with _admin(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    if row and row[0]:
        raise SystemExit(f"--database {_shown(url)}: has {row[0]} tables; the benchmark needs an empty "
                         "database (it drops what it creates); give another name, or the server URL "
                         "without a database name for a scratch one")


def _wipe(url: str) -> None:
    with _admin(url) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


def _shown(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
