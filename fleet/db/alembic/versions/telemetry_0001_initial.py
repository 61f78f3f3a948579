"""Telemetry: merged windows, the (device, seq) pairs already counted, each device's totals.

Before Alembic these tables were created by sqlite-utils when missing (and the device totals
only once that feature existed), so an existing telemetry.db may hold any of them already:
this baseline creates only the missing ones, which adopts such a file without a stamp.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "telemetry_0001"
down_revision = None
branch_labels = ("telemetry",)
depends_on = None


def upgrade() -> None:
    have = set(sa.inspect(op.get_bind()).get_table_names())
    if "telemetry_windows" not in have:
        op.create_table(
            "telemetry_windows",
            sa.Column("model", sa.Text, primary_key=True),
            sa.Column("version", sa.Text, primary_key=True),
            sa.Column("cohort", sa.Text, primary_key=True),
            sa.Column("window_start", sa.Float, primary_key=True),
            sa.Column("payload", sa.LargeBinary),
            sa.Column("reports", sa.Integer),
            sa.Column("devices", sa.Text),
            sa.Column("device_count", sa.Integer),
            sa.Column("latency_kll", sa.LargeBinary),
            sa.Column("updated_at", sa.Float),
        )
    if "telemetry_seen" not in have:
        op.create_table(
            "telemetry_seen",
            sa.Column("device_id", sa.Text, primary_key=True),
            sa.Column("seq", sa.BigInteger, primary_key=True),
            sa.Column("received_at", sa.Float),
        )
        op.create_index("idx_telemetry_seen_received_at", "telemetry_seen", ["received_at"])
    if "telemetry_device_totals" not in have:
        op.create_table(
            "telemetry_device_totals",
            sa.Column("device_id", sa.Text, primary_key=True),
            sa.Column("model", sa.Text, primary_key=True),
            sa.Column("version", sa.Text, primary_key=True),
            sa.Column("window_start", sa.Float, primary_key=True),
            sa.Column("requests", sa.BigInteger),
            sa.Column("errors", sa.BigInteger),
            sa.Column("latency_count", sa.BigInteger),
            sa.Column("latency_sum_ms", sa.Float),
        )
        op.create_index("idx_telemetry_device_totals_model_version_window_start", "telemetry_device_totals",
                        ["model", "version", "window_start"])
