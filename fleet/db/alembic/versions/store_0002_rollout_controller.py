"""Store migration 2: the rollout controller's durable state and A/B experiments.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0002"
down_revision = "store_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollout_runtime",
        sa.Column("rollout_id", sa.Text, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("phase", sa.Text, nullable=False),
        sa.Column("target_bundle", sa.Text, nullable=False),
        sa.Column("target_path", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("stage_started_at", sa.Float, nullable=False),
        sa.Column("stage_done_at", sa.Float),
        sa.Column("breach", sa.Text, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("final_state", sa.Text),
    )

    op.create_table(
        "rollout_progress",
        sa.Column("rollout_id", sa.Text, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("ordinal", sa.Text, nullable=False),
        sa.Column("from_bundle", sa.Text),
        sa.Column("assigned_at", sa.Float),
        sa.Column("acked", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("outcome", sa.Text),
        sa.Column("revert_at", sa.Float),
        sa.Column("detail", sa.Text, nullable=False, server_default=sa.text("''")),
    )
    op.create_index("rollout_progress_order", "rollout_progress", ["rollout_id", "ordinal"])

    op.create_table(
        "rollout_commands",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.Text, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("command", sa.Text, sa.CheckConstraint("command IN ('promote', 'rollback', 'cancel')"),
                  nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("done_at", sa.Text),
        sqlite_autoincrement=True,
    )

    op.create_table(
        "experiments",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("model_name", sa.Text, nullable=False),
        sa.Column("version_a", sa.Text, nullable=False),
        sa.Column("version_b", sa.Text, nullable=False),
        sa.Column("selector", sa.Text, nullable=False),
        sa.Column("split_b", sa.Float, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("min_samples", sa.Integer, nullable=False),
        sa.Column("alpha", sa.Float, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
    )

    op.create_table(
        "experiment_observations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("experiment_id", sa.Text, sa.ForeignKey("experiments.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("arm", sa.Text, sa.CheckConstraint("arm IN ('a', 'b')"), nullable=False),
        sa.Column("metric", sa.Text, nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("weight", sa.Integer, nullable=False, server_default=sa.text("1")),
        sqlite_autoincrement=True,
    )
    op.create_index("experiment_observations_arm", "experiment_observations", ["experiment_id", "metric",
                                                                               "arm"])

