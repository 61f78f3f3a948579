"""Store migration 5: device-level, always-valid A/B tests (issue 19).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0005"
down_revision = "store_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("experiments", sa.Column("min_devices", sa.Integer, nullable=False,
                                           server_default=sa.text("10")))
    op.add_column("experiments", sa.Column("taus", sa.Text, nullable=False, server_default=sa.text("'{}'")))
    op.create_table(
        "experiment_sequential",
        sa.Column("experiment_id", sa.Text, sa.ForeignKey("experiments.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("metric", sa.Text, primary_key=True),
        sa.Column("p_value", sa.Float, nullable=False),
        sa.Column("ci_low", sa.Float, nullable=False),
        sa.Column("ci_high", sa.Float, nullable=False),
        sa.Column("tau", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )

