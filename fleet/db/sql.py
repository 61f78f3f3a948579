"""The few SQL expressions that differ between SQLite and PostgreSQL, each chosen in one place.

Everything else the repositories write is portable SQL or SQLAlchemy Core. Here: the upsert
(`INSERT ... ON CONFLICT`, built by each dialect's own `insert()` construct, so SQLAlchemy
renders it, not us) and reading one key of a JSON text column (`json_extract` on SQLite,
`->>` over a `jsonb` cast on PostgreSQL; JSON stays TEXT on both so the stored bytes, hashes
and audit copies are identical).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

SetClause = Callable[[sa.Table, Any], Any]  # (table, excluded) -> the column's new value


def upsert_statement(dialect: str, table: sa.Table, key: Sequence[str], columns: Iterable[str],
                     update: Sequence[str] | Mapping[str, SetClause] | None = None) -> Any:
    """`INSERT INTO table ... ON CONFLICT (key) DO UPDATE SET ...` for `dialect`.

    `update=None` overwrites every inserted non-key column with the new value; a sequence
    names the columns to overwrite; a mapping gives each column a function of (table,
    excluded) for its new value (`lambda t, ex: t.c.n + ex.n` adds); empty means DO NOTHING.
    """
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    if update is None:
        update = [c for c in columns if c not in key]
    if not update:
        return stmt.on_conflict_do_nothing(index_elements=list(key))
    if isinstance(update, Mapping):
        values = {c: fn(table, stmt.excluded) for c, fn in update.items()}
    else:
        values = {c: stmt.excluded[c] for c in update}
    return stmt.on_conflict_do_update(index_elements=list(key), set_=values)


def json_text(dialect: str, column: str, bind: str) -> str:
    """SQL for the value at key `:bind` of JSON text `column` (NULL when absent), as text on
    PostgreSQL, as SQLite's typed value on SQLite. Bind `json_key(dialect, key)` to `bind`.
    `column` must be a trusted identifier."""
    if dialect == "postgresql":
        return f"(CAST({column} AS jsonb) ->> :{bind})"
    return f"json_extract({column}, :{bind})"


def json_key(dialect: str, key: str) -> str:
    """The bound value naming `key` for `json_text` (a JSON path on SQLite, the key itself on PG)."""
    return key if dialect == "postgresql" else f'$."{key}"'


def json_field(dialect: str, column: str, key: str) -> str:
    """`json_text` for a constant, trusted `key` (an identifier), inlined."""
    if not key.isidentifier():
        raise ValueError(f"json_field key {key!r} must be an identifier")
    if dialect == "postgresql":
        return f"(CAST({column} AS jsonb) ->> '{key}')"
    return f"json_extract({column}, '$.{key}')"


def json_pairs(dialect: str, column: str, alias: str) -> str:
    """A FROM item yielding (`alias`.key, `alias`.value) for each member of JSON object `column`."""
    if dialect == "postgresql":
        return f"jsonb_each_text(CAST({column} AS jsonb)) AS {alias}(key, value)"
    return f"json_each({column}) AS {alias}"
