"""The fleet's database layer, below every feature slice (it imports none of them).

Two backends behind one API: SQLite (WAL, the embedded default, one file per store in the
data directory) and PostgreSQL (every table in the one database of `--database
postgresql://...`), both through SQLAlchemy 2 Core; the schema is Alembic's (revisions in
`fleet/db/alembic/`, run at open, no alembic.ini).

Modules: `engine` turns a path or URL into an engine (SQLite pragmas, psycopg pool, password
never logged); `database.Database` holds an engine, one group of tables and the transactions
(telemetry, alerts and director sequences open one each); `database.FleetDatabase` is the
fleet store's, with the clock and the paging;
`session.Db` is what a repository talks to; `schema` declares every table; `migrate` runs
Alembic; `sql` holds the few expressions that differ by dialect; `paging` the cursors; `rows`
the JSON/time encoding and the typed `Record` base; `audit` and `idempotency` the two tables
every slice or route shares.

The repository-facing API (keep to it; it is all a repository needs)::

    database = FleetDatabase(path_or_url, clock=time.time)   # sqlite file path or postgresql:// URL
    with database.tx() as db:          # one write transaction; a nested tx() is a SAVEPOINT;
        ...                            # any exception rolls back (to the savepoint when nested)
    with database.read() as db:        # reads (inside a tx on this thread: the same connection)
        ...
    database.now()                     # ISO-8601 UTC text from the injected clock
    database.dialect                   # "sqlite" or "postgresql" (for fleet.db.sql helpers)
    database.page_of(sql, params, key, cursor, limit, Record.from_row, descending=False)
    database.page(sql, params, key, cursor, limit, json_cols=(), descending=False)

    # `db` (a `fleet.db.session.Db`):
    db.execute(sql, {"name": value})   # -> SQLAlchemy Result: .fetchone()[0], .fetchall(), .rowcount
    db.query(sql, {...})               # -> list of row mappings (row["column"]; Record.from_row(row))
    db.one(sql, {...})                 # -> the first row mapping or None
    db.scalar(sql, {...})              # -> the first column of the first row, or None
    db.insert("table", row_or_rows)    # plain INSERT of dict(s)
    db.insert_id("table", row)         # INSERT of one row, returns its new integer `id`
    db.upsert("table", rows, key=("col", ...), update=None)  # ON CONFLICT (key) DO UPDATE the
                                       # other columns (or `update`); update=() -> DO NOTHING

SQL is text with *named* binds (`WHERE id = :id`, params a dict); a list or tuple value binds
an IN list (`WHERE id IN :ids`, no parentheses). `sql` may also be any SQLAlchemy Core
statement over the `fleet.db.schema` tables. Write portable SQL: `WHERE TRUE` (not `WHERE 1`),
0/1 integer flags, `coalesce`, and `fleet.db.sql.json_text(...)` instead of `json_extract`.
A unique, foreign-key, check or trigger violation raises `fleet.errors.Conflict` (the database
seam translates it once): catch `Conflict` around the statement to give it a better message.
A database that fails as such (locked, connection lost) raises `fleet.db.session.DatabaseError`:
a periodic loop that retries next cycle catches that, never a driver's exception type.
Old code written against sqlite_utils (`db.execute(sql, [params])` with `?`, `db.table(t)`)
ports by renaming binds to `:name`, passing a dict, and `db.table(t).insert(r)` ->
`db.insert(t, r)`.
"""
