"""Every table of the fleet, declared once as SQLAlchemy `Table`s (both dialects).

Four groups, one `MetaData` each, because on SQLite each lives in its own file (the fleet
store, the telemetry windows, the alerts, the director's sequences) while on PostgreSQL all
four share the one database. The schema is *made* by the Alembic revisions in
`fleet/db/alembic/versions/` (one branch per group); the group modules (`store_tables`,
`telemetry_tables`, `alert_tables`, `director_tables`) are what the code reads and writes
through, this module names the groups (`GROUPS`, `table`), and a test checks that the migrated
database and these declarations agree.

Types are chosen to mean the same on both dialects: TEXT for text and JSON documents (the
stored bytes are what is hashed and audited), INTEGER for 0/1 flags and counts, BIGINT where a
number may pass 2^31 (sequences), FLOAT (double precision on PostgreSQL, REAL affinity on
SQLite) for clock seconds and measurements, BLOB/bytea for sketches.
"""

from __future__ import annotations

import sqlalchemy as sa

from fleet.db.alert_tables import ALERTS
from fleet.db.director_tables import DIRECTOR
from fleet.db.store_tables import STORE
from fleet.db.telemetry_tables import TELEMETRY

__all__ = ["ALERTS", "DIRECTOR", "GROUPS", "STORE", "TELEMETRY", "table"]

GROUPS: dict[str, sa.MetaData] = {"store": STORE, "telemetry": TELEMETRY, "alerts": ALERTS,
                                  "director": DIRECTOR}


def table(name: str) -> sa.Table:
    """The declared table called `name`. Raises KeyError for an unknown name."""
    for md in GROUPS.values():
        if name in md.tables:
            return md.tables[name]
    raise KeyError(f"no table {name!r} in fleet.db.schema")
