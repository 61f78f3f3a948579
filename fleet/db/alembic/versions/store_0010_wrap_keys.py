"""Store migration 9: the devices' X25519 wrap keys (issue 14, bundle encryption).

A device sends the public half of a key made at enrollment (`wrap_public_key`); a sealed
bundle's content key is wrapped for the keys of its cohort. A table of its own (not a column of
`devices`) so a device's key can be replaced without touching the inventory row, and so it
deletes with its device.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0010"
down_revision = "store_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_wrap_keys",
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("device_wrap_keys")
