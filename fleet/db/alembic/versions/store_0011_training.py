"""Store migration 9: training jobs (issue 13).

A training job's record (`fleet.training.jobs`): what started it (a retraining trigger's alert
id, unique, so a trigger starts one job however often the worker sees it, or an operator), the
parent version, the dataset versions it trained on, its state in the lifecycle of
`fleet.training.machine`, progress, the version and rollout it produced; and its log lines,
bounded per job. The version's lineage (trigger, datasets, parent) is in the version's own
immutable `lineage` document, written in the same transaction that ends the job's publishing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0011"
down_revision = "store_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("parent_version", sa.Text, nullable=False),
        sa.Column("cohort", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("trigger_alert_id", sa.BigInteger, unique=True),
        sa.Column("dataset_ids", sa.Text, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("step", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("progress", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("worker", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("cancel_requested", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("approval", sa.Text),
        sa.Column("result_version", sa.Text),
        sa.Column("rollout_id", sa.Text),
        sa.Column("metrics", sa.Text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("error", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("history", sa.Text, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
    )
    op.create_index("training_jobs_state", "training_jobs", ["state"])
    op.create_table(
        "training_logs",
        sa.Column("job_id", sa.Text, sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("line", sa.Text, nullable=False),
    )
