"""Alembic's environment for the fleet: always run programmatically by `fleet.db.migrate`.

The caller hands over an open SQLAlchemy connection already inside its transaction
(`config.attributes["connection"]`), so every revision of one upgrade commits together with
its bookkeeping or not at all; there is no alembic.ini and no offline (SQL script) mode.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("fleet migrations run through fleet.db.migrate, which passes a connection")
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
