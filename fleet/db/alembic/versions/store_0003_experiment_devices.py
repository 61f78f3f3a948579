"""Store migration 3: which arm each device of an A/B experiment runs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0003"
down_revision = "store_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiment_devices",
        sa.Column("experiment_id", sa.Text, sa.ForeignKey("experiments.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("arm", sa.Text, sa.CheckConstraint("arm IN ('a', 'b')"), nullable=False),
        sa.Column("assigned_at", sa.Float),
    )

