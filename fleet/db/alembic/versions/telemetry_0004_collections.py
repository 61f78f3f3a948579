"""Telemetry 4: the operator's data collection requests (issue 13, `fleet/collection`).

One row per collection: the model version and device selector it asks, the signed policy it
puts in those devices' director documents, the devices that got it, and its status
(`waiting_for_drift`, `collecting`, `closed`, `stopped`). Beside `dataset_versions`, which
the chunks it admits become.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "telemetry_0004"
down_revision = "telemetry_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "collections",
        sa.Column("collection_id", sa.Text, primary_key=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("selector", sa.Text, nullable=False),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("devices", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("closes_at", sa.Float, nullable=False),
        sa.Column("applied", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("collections")
