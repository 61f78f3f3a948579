"""PostgreSQL for the tests: a session database on 127.0.0.1:5432 and a fresh schema per test.

The machine's PostgreSQL (trust auth for `postgres` on 127.0.0.1; `.ci/run` starts it) holds a
uniquely named database per test session, dropped `WITH (FORCE)` at the end. Each test that
runs on PostgreSQL gets its own schema in it (`search_path` set through the URL's `options`),
so stores opened by the test migrate into an empty schema exactly as on a fresh server, and
tests never see each other's rows. PostgreSQL unreachable is a failure, never a skip: a
PostgreSQL test that does not run is a failed test.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

HOST, PORT, USER = "127.0.0.1", 5432, "postgres"
ADMIN_DSN = f"host={HOST} port={PORT} user={USER} dbname=postgres connect_timeout=5"


def url(dbname: str, schema: str | None = None) -> str:
    """The `postgresql://` URL of `dbname` (with `schema` first on the search path)."""
    base = f"postgresql://{USER}@{HOST}:{PORT}/{dbname}"
    return base if schema is None else f"{base}?options={quote(f'-csearch_path={schema}')}"


@dataclass(frozen=True)
class Backend:
    """Where a test's stores live: `location(file)` is a SQLite path or the PostgreSQL URL."""

    name: str
    tmp_path: Path
    pg_url: str | None = None

    def location(self, filename: str = "fleet.db") -> Path | str:
        """SQLite: `tmp_path/filename` (one file per store, as in production); PostgreSQL: the
        one URL every store of the test shares."""
        return self.pg_url if self.pg_url is not None else self.tmp_path / filename


def _admin(dbname: str = "postgres") -> psycopg.Connection:
    try:
        return psycopg.connect(ADMIN_DSN.replace("dbname=postgres", f"dbname={dbname}"), autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable on {HOST}:{PORT} (start it: pg_ctlcluster "
                    f"--skip-systemctl-redirect $(ls /etc/postgresql) main start): {exc}", pytrace=False)


def create_database() -> str:
    """Create a uniquely named database; returns its name. Fails the test when unreachable."""
    name = f"edgefleet_test_{secrets.token_hex(6)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_schema(dbname: str) -> str:
    """A new, empty schema in `dbname`; returns its name."""
    schema = f"t_{secrets.token_hex(6)}"
    with _admin(dbname) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema


def drop_schema(dbname: str, schema: str) -> None:
    with _admin(dbname) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
