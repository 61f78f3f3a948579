"""Alerts 2: every alert kind (error rate, latency, offline, rollout gate beside drift), in
episodes with escalations (fleet/telemetry/alerts.py, alert_records.py).

`drift_alerts` (the name predates the other kinds) gains the episode it belongs to, its
escalation number, the features it names, the baseline version a regression was judged
against, a detail and its evidence (JSON); `drift_episodes` gains the clean streak that ends
an episode, its members, its escalations and the alert that opened it; `alert_episodes` holds
the episodes of the kinds beyond drift. Columns or tables already there (an alerts.db the
pre-Alembic branch extended at runtime) are left as they are.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "alerts_0002"
down_revision = "alerts_0001"
branch_labels = None
depends_on = None

Columns = tuple[tuple[str, type[sa.types.TypeEngine[Any]]], ...]
_ALERT_COLUMNS: Columns = (("episode", sa.Integer), ("escalation", sa.Integer), ("features", sa.Text),
                  ("baseline", sa.Text), ("detail", sa.Text), ("evidence", sa.Text))
_EPISODE_COLUMNS: Columns = (("clear_streak", sa.Integer), ("members", sa.Text), ("escalations", sa.Integer),
                    ("alert_id", sa.Integer))


def _add_missing(table: str, columns: Columns) -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}
    for name, kind in columns:
        if name not in have:
            op.add_column(table, sa.Column(name, kind))


def upgrade() -> None:
    _add_missing("drift_alerts", _ALERT_COLUMNS)
    _add_missing("drift_episodes", _EPISODE_COLUMNS)
    if "alert_episodes" not in set(sa.inspect(op.get_bind()).get_table_names()):
        op.create_table(
            "alert_episodes",
            *(sa.Column(n, sa.Text, primary_key=True) for n in ("kind", "model", "version", "cohort",
                                                                 "subject")),
            sa.Column("first_window", sa.Float), sa.Column("last_window", sa.Float),
            sa.Column("consecutive", sa.Integer),
            *(sa.Column(n, t) for n, t in _EPISODE_COLUMNS),
        )
