"""`Db`: what a repository holds inside `FleetDatabase.tx()` / `.read()` (one connection).

A thin layer over an SQLAlchemy `Connection`, small on purpose (see `fleet.db`'s docstring):
text SQL with named binds or Core statements, rows as mappings, inserts and upserts by table
name. It is also the one seam where an integrity violation (unique key, foreign key, CHECK,
or a trigger's refusal, on either dialect) becomes the fleet's `Conflict`, so no repository
imports a driver's exception type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult
from sqlalchemy.sql import Executable

from fleet.db.schema import table as schema_table
from fleet.db.sql import upsert_statement
from fleet.errors import Conflict

Params = Mapping[str, Any]
#: What a statement raises when the database itself fails (locked, connection lost, a driver
#: error) rather than a constraint (`Conflict`): a loop that retries next cycle catches this,
#: so it needs no driver's or SQLAlchemy's exception type.
DatabaseError = sa.exc.DBAPIError


def statement(sql: str | Executable, params: Params | None = None) -> Executable:
    """`sql` as an executable: text gets its list/tuple binds expanded into IN lists.

    An empty list matches nothing; PostgreSQL needs a type even then, so an empty list binds
    as text (every IN list of the fleet is of text ids; guard an empty integer list yourself).
    """
    if not isinstance(sql, str):
        return sql
    stmt = sa.text(sql)
    expanding: list[sa.BindParameter[Any]] = [
        sa.bindparam(k, expanding=True, type_=None if v else sa.Text())
        for k, v in (params or {}).items() if isinstance(v, list | tuple)]
    return stmt.bindparams(*expanding) if expanding else stmt


class Db:
    """One connection in a transaction; every statement of a `tx()` block goes through it."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return str(self.conn.dialect.name)

    def execute(self, sql: str | Executable,
                params: Params | Sequence[Params] | None = None) -> CursorResult[Any]:
        """Run one statement (a list of dicts runs it once per dict). Raises Conflict on an
        integrity violation; the transaction (or the innermost savepoint) is then unusable on
        PostgreSQL, so let the Conflict leave the `tx()` block."""
        first = params[0] if isinstance(params, Sequence) and params else params
        stmt = statement(sql, first if isinstance(first, Mapping) else None)
        try:
            if isinstance(params, Sequence):
                return self.conn.execute(stmt, [dict(p) for p in params])
            return self.conn.execute(stmt, dict(params) if params else None)
        except sa.exc.IntegrityError as exc:
            raise Conflict(f"integrity violation: {_reason(exc)}") from exc

    def query(self, sql: str | Executable, params: Params | None = None) -> list[dict[str, Any]]:
        """Every row as a dict (column name -> value)."""
        return [dict(r) for r in self.execute(sql, params).mappings()]

    def one(self, sql: str | Executable, params: Params | None = None) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        row = self.execute(sql, params).mappings().first()
        return None if row is None else dict(row)

    def scalar(self, sql: str | Executable, params: Params | None = None) -> Any:
        row = self.execute(sql, params).first()
        return None if row is None else row[0]

    def insert(self, table: str | sa.Table, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """INSERT one dict or many (nothing for an empty list)."""
        batch = [dict(rows)] if isinstance(rows, Mapping) else [dict(r) for r in rows]
        if batch:
            self.execute(sa.insert(_table(table)), batch if len(batch) > 1 else batch[0])

    def insert_id(self, table: str | sa.Table, row: Mapping[str, Any]) -> int:
        """INSERT one row and return its generated integer `id` (RETURNING on both dialects)."""
        t = _table(table)
        return int(self.execute(sa.insert(t).values(dict(row)).returning(t.c.id)).scalar_one())

    def upsert(self, table: str | sa.Table, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]],
               key: Sequence[str], update: Sequence[str] | Mapping[str, Any] | None = None) -> None:
        """INSERT ... ON CONFLICT (key) DO UPDATE (see `fleet.db.sql.upsert_statement`)."""
        batch = [dict(rows)] if isinstance(rows, Mapping) else [dict(r) for r in rows]
        if not batch:
            return
        stmt = upsert_statement(self.dialect, _table(table), key, batch[0].keys(), update)
        self.execute(stmt, batch if len(batch) > 1 else batch[0])


def _table(table: str | sa.Table) -> sa.Table:
    return table if isinstance(table, sa.Table) else schema_table(table)


def _reason(exc: sa.exc.IntegrityError) -> str:
    """The driver's message without SQL or parameters (they may hold secrets)."""
    return str(exc.orig).splitlines()[0] if exc.orig is not None else "constraint failed"
