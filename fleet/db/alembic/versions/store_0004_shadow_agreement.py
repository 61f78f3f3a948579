"""Store migration 4: a rollout's shadow agreement, kept across restarts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0004"
down_revision = "store_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rollout_runtime", sa.Column("shadow_agreement_sum", sa.Float, nullable=False,
                                               server_default=sa.text("0")))
    op.add_column("rollout_runtime", sa.Column("shadow_compared", sa.Float, nullable=False,
                                               server_default=sa.text("0")))
