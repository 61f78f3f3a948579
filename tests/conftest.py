"""Session fixtures: a private Mosquitto broker, a PostgreSQL database, and the store backends.

The broker itself is `tests.support.broker`; tests that need their own broker call
`start_mosquitto` from there (no test imports this module). `backend` parametrizes a store
test over SQLite (a file in the test's tmp dir) and PostgreSQL (a fresh schema in the
session's database, `tests.support.postgres`); the PostgreSQL case carries the `postgres`
marker and fails, never skips, when the server is unreachable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import postgres as pg
from tests.support.broker import Broker, start_mosquitto
from tests.support.postgres import Backend


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A private Mosquitto for the whole session (anonymous, MQTT v5 capable)."""
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[str]:
    """The name of this session's own PostgreSQL database (created here, dropped at the end)."""
    name = pg.create_database()
    try:
        yield name
    finally:
        pg.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store test once on SQLite and once on PostgreSQL (a fresh schema per test)."""
    if request.param == "sqlite":
        yield Backend("sqlite", tmp_path)
        return
    dbname: str = request.getfixturevalue("postgres_db")
    schema = pg.create_schema(dbname)
    try:
        yield Backend("postgres", tmp_path, pg.url(dbname, schema))
    finally:
        pg.drop_schema(dbname, schema)
