"""Bring a database to the schema this code expects: Alembic, run programmatically at open.

The revisions live in `fleet/db/alembic/versions/`, one branch per group of tables
(`fleet.db.schema.GROUPS`: `store`, `telemetry`, `alerts`, `director`). On SQLite each group has
its own file and its own `alembic_version` table; on PostgreSQL the groups share one
database and one `alembic_version` table holding one head per branch. Opening a store
upgrades its group to head inside one transaction (a crash leaves the previous version, never
half a migration); on PostgreSQL a transaction-scoped advisory lock serialises fleet processes
that start together, so each revision runs once.

Adoption of a fleet.db made by the old hand-written runner (a `schema_migrations` table with
versions 1..N): its highest version N is stamped as Alembic revision `store_000N` (the
revisions reproduce the old migrations one for one), then the missing ones run; no row is
touched. `schema_migrations` is left in place, unused.

Adding a schema change: a new file in `fleet/db/alembic/versions/` whose `revision` is
`<group>_<NNNN>` (the prefix is how `current` tells the branches apart) and whose
`down_revision` is the group's current head; write it with `op.*` (portable) and branch on
`op.get_bind().dialect.name` only where the dialects differ (see store_0001's triggers); then
declare the same change in `fleet.db.schema`. The store tests check that a migrated database
and the declarations agree on both backends. Released revisions are never edited.
"""

from __future__ import annotations

import functools
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

SCRIPTS = Path(__file__).with_name("alembic")
ADVISORY_LOCK_KEY = 0x666C656574  # "fleet": one key for every fleet migration on a database
OLD_RUNNER_TABLE = "schema_migrations"


def _config(conn: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.attributes["connection"] = conn
    return cfg


@functools.cache
def scripts() -> ScriptDirectory:
    """The revision scripts (parsed once per process)."""
    return ScriptDirectory(str(SCRIPTS))


def head(group: str) -> str:
    """The newest revision of `group`'s branch."""
    rev = scripts().get_revision(f"{group}@head")
    assert rev is not None
    return str(rev.revision)


def current(conn: sa.Connection, group: str) -> str | None:
    """The revision `group` is at in this database (None when never migrated)."""
    for rev in MigrationContext.configure(conn).get_current_heads():
        if rev.startswith(f"{group}_"):
            return rev
    return None


def upgrade(conn: sa.Connection, group: str) -> list[str]:
    """Upgrade `group` to head inside the caller's transaction; return the revisions applied
    (oldest first; empty when already current)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
    before = current(conn, group)
    if before is None and group == "store":
        before = _adopt_old_runner(conn)
    target = head(group)
    if before == target:
        return []
    command.upgrade(_config(conn), f"{group}@head")
    pending = [str(r.revision) for r in scripts().iterate_revisions(target, before or "base")]
    return list(reversed(pending))


def _adopt_old_runner(conn: sa.Connection) -> str | None:
    """Stamp the revision matching an old runner's `schema_migrations` (None when absent)."""
    if OLD_RUNNER_TABLE not in sa.inspect(conn).get_table_names():
        return None
    version = conn.execute(sa.text(f"SELECT max(version) FROM {OLD_RUNNER_TABLE}")).scalar()  # noqa: S608
    if not version:
        return None
    rev = f"store_{int(version):04d}"
    command.stamp(_config(conn), rev)
    return rev
