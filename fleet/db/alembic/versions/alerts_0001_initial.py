"""Drift alerts: the alerts, the open episodes, the evaluation cursor and the acknowledgements.

Like telemetry's, these tables were created by sqlite-utils when missing, so the baseline
creates only the missing ones (an existing alerts.db is adopted as it is).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "alerts_0001"
down_revision = None
branch_labels = ("alerts",)
depends_on = None


def upgrade() -> None:
    have = set(sa.inspect(op.get_bind()).get_table_names())
    if "drift_alerts" not in have:
        op.create_table(
            "drift_alerts",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            *(sa.Column(n, sa.Text) for n in ("kind", "model", "version", "cohort", "subject", "statistic")),
            sa.Column("value", sa.Float), sa.Column("threshold", sa.Float),
            sa.Column("window_start", sa.Float), sa.Column("window_s", sa.Float), sa.Column("windows",
                                                                                            sa.Integer),
            sa.Column("devices", sa.Text), sa.Column("device_count", sa.Integer), sa.Column("created_at",
                                                                                            sa.Float),
            sa.Column("delivered", sa.Integer), sa.Column("delivery_error", sa.Text),
        )
    if "drift_episodes" not in have:
        op.create_table(
            "drift_episodes",
            *(sa.Column(n, sa.Text, primary_key=True) for n in ("model", "version", "cohort", "subject")),
            sa.Column("first_window", sa.Float), sa.Column("last_window", sa.Float),
            sa.Column("consecutive", sa.Integer), sa.Column("retrain_fired", sa.Integer),
        )
    if "drift_cursor" not in have:
        op.create_table(
            "drift_cursor",
            *(sa.Column(n, sa.Text, primary_key=True) for n in ("model", "version", "cohort")),
            sa.Column("last_window", sa.Float),
        )
    if "drift_alert_acks" not in have:
        op.create_table(
            "drift_alert_acks",
            sa.Column("alert_id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("acked_by", sa.Text), sa.Column("acked_at", sa.Float), sa.Column("note", sa.Text),
        )
