"""`--database` of the scale benchmarks: scratch PostgreSQL databases are created empty and
dropped, a named database must be empty and is left empty, bad URLs are one sentence."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from benchmarks.db_url import parse_database
from fleet.store import Store
from tests.support import postgres as pg


def _exists(name: str) -> bool:
    with psycopg.connect(pg.ADMIN_DSN, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _tables(name: str) -> int:
    with psycopg.connect(pg.ADMIN_DSN.replace("dbname=postgres", f"dbname={name}"), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    return int(row[0]) if row else 0


@pytest.mark.integration
@pytest.mark.postgres
def test_a_server_url_gets_a_scratch_database_that_is_dropped(tmp_path: Path) -> None:
    db = parse_database(f"postgresql://{pg.USER}@{pg.HOST}:{pg.PORT}")
    assert db.backend == "pg"
    with db.scratch(tmp_path) as location:
        assert isinstance(location, str)
        name = location.rsplit("/", 1)[1]
        assert _exists(name) and _tables(name) == 0
        store = Store(location)  # the fleet migrates into it like any database
        store.close()
        assert _tables(name) > 0
    assert not _exists(name)


@pytest.mark.integration
@pytest.mark.postgres
def test_a_named_database_must_be_empty_and_is_left_empty(tmp_path: Path) -> None:
    name = pg.create_database()
    try:
        db = parse_database(pg.url(name))
        with db.scratch(tmp_path) as location:
            Store(location).close()
            assert _tables(name) > 0
        assert _tables(name) == 0  # what the benchmark created is gone
        Store(pg.url(name)).close()  # someone's data: refused, not measured or wiped
        with pytest.raises(SystemExit, match="needs an empty database"), db.scratch(tmp_path):
            pass
        assert _tables(name) > 0
    finally:
        pg.drop_database(name)


@pytest.mark.unit
def test_sqlite_and_bad_urls(tmp_path: Path) -> None:
    db = parse_database(None)
    with db.scratch(tmp_path) as location:
        assert location == tmp_path / "fleet.db"
    assert parse_database(f"sqlite://{tmp_path}/x.db").path == tmp_path / "x.db"
    with pytest.raises(SystemExit, match="give sqlite"):
        parse_database("mysql://root@localhost/db")
    with pytest.raises(SystemExit, match="does not answer"):
        parse_database("postgresql://postgres@127.0.0.1:1/none")
