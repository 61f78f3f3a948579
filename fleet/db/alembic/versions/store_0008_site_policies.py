"""Store migration 8: rollouts that respect the sites (issue 15).

The last stage an operator approved and since when the rollout waits for the current one (its
approval timeout counts from there); per device, when it last reported a hold (waiting for its
window, or short of resources), from which its install timeout counts again; and `approve`
among the queued operator commands. The command's CHECK constraint is unnamed in revision 2:
PostgreSQL named it `rollout_commands_command_check`, SQLite cannot alter one, so there the
table is rebuilt (same columns and ids; nothing references it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0008"
down_revision = "store_0007"
branch_labels = None
depends_on = None

COMMANDS = "command IN ('promote', 'rollback', 'cancel', 'approve')"


def upgrade() -> None:
    op.add_column("rollout_runtime", sa.Column("approved_stage", sa.Integer, nullable=False,
                                               server_default=sa.text("-1")))
    op.add_column("rollout_runtime", sa.Column("approval_requested_at", sa.Float))
    op.add_column("rollout_progress", sa.Column("hold_seen_at", sa.Float))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE rollout_commands DROP CONSTRAINT rollout_commands_command_check")
        op.execute("ALTER TABLE rollout_commands ADD CONSTRAINT rollout_commands_command_check "
                   f"CHECK ({COMMANDS})")
        return
    op.create_table(
        "rollout_commands_new",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.Text, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("command", sa.Text, sa.CheckConstraint(COMMANDS), nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("done_at", sa.Text),
        sqlite_autoincrement=True,
    )
    op.execute("INSERT INTO rollout_commands_new (id, rollout_id, command, actor, note, created_at, done_at) "
               "SELECT id, rollout_id, command, actor, note, created_at, done_at FROM rollout_commands")
    op.drop_table("rollout_commands")
    op.rename_table("rollout_commands_new", "rollout_commands")
