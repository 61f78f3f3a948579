"""Telemetry 2: dataset versions collected from devices under a signed policy (issue 13).

`dataset_chunks` holds the chunks of uploads in flight (a redelivered chunk hits the primary
key and is a duplicate); `dataset_versions` the checked, reassembled archives with their digest
and provenance. They live beside the telemetry windows: device data, written by the ingest side.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "telemetry_0002"
down_revision = "telemetry_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_chunks",
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("upload_id", sa.Text, primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("policy_id", sa.Text, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("dataset_id", sa.Text, primary_key=True),
        sa.Column("policy_id", sa.Text, nullable=False),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("columns", sa.Integer, nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("provenance", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("archive", sa.LargeBinary, nullable=False),
    )
