"""The `alerts` group of `fleet.db.schema` (`alerts.db` on SQLite): alerts, their episodes,
the drift monitor's cursor and acknowledgements.

One module per group because each group is one SQLite file (one `MetaData`, migrated by its
own Alembic branch, `alerts_*`).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import Column, Float, Integer, Table, Text

ALERTS = sa.MetaData()

drift_alerts = Table(
    "drift_alerts", ALERTS,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", Text), Column("model", Text), Column("version", Text), Column("cohort", Text),
    Column("subject", Text), Column("statistic", Text), Column("value", Float), Column("threshold", Float),
    Column("window_start", Float), Column("window_s", Float), Column("windows", Integer),
    Column("devices", Text), Column("device_count", Integer), Column("created_at", Float),
    Column("delivered", Integer), Column("delivery_error", Text),
    # alerts_0002: every kind's alerts, grouped into episodes and escalations
    Column("episode", Integer), Column("escalation", Integer), Column("features", Text),
    Column("baseline", Text), Column("detail", Text), Column("evidence", Text),
)
drift_episodes = Table(
    "drift_episodes", ALERTS,
    Column("model", Text, primary_key=True),
    Column("version", Text, primary_key=True),
    Column("cohort", Text, primary_key=True),
    Column("subject", Text, primary_key=True),
    Column("first_window", Float), Column("last_window", Float),
    Column("consecutive", Integer), Column("retrain_fired", Integer),
    # alerts_0002
    Column("clear_streak", Integer), Column("members", Text), Column("escalations", Integer),
    Column("alert_id", Integer),
)
alert_episodes = Table(  # episodes of the kinds beyond drift (alerts_0002)
    "alert_episodes", ALERTS,
    Column("kind", Text, primary_key=True),
    Column("model", Text, primary_key=True),
    Column("version", Text, primary_key=True),
    Column("cohort", Text, primary_key=True),
    Column("subject", Text, primary_key=True),
    Column("first_window", Float), Column("last_window", Float), Column("consecutive", Integer),
    Column("clear_streak", Integer), Column("members", Text), Column("escalations", Integer),
    Column("alert_id", Integer),
)
drift_cursor = Table(
    "drift_cursor", ALERTS,
    Column("model", Text, primary_key=True),
    Column("version", Text, primary_key=True),
    Column("cohort", Text, primary_key=True),
    Column("last_window", Float),
)
drift_alert_acks = Table(
    "drift_alert_acks", ALERTS,
    Column("alert_id", Integer, primary_key=True, autoincrement=False),
    Column("acked_by", Text), Column("acked_at", Float), Column("note", Text),
)
