"""Store migration 7: several fleet processes on one database (issue 11).

The leader lease of the rollout controller and drift monitor (`fleet.cluster.lease`); device
events stored once per (device, seq) whichever ingest worker got them
(`fleet.delivery.event_log`), so the controller, possibly in another process, applies each
exactly once; and an index of rollout progress by device, which fleet-scale stages need
(without it each device's lookup scans every rollout's progress rows: O(n^2) per stage).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0007"
down_revision = "store_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.Text, primary_key=True),                       # e.g. "controller"
        sa.Column("holder", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("fencing_token", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("expires_at", sa.Float, nullable=False, server_default=sa.text("0")),
    )
    op.create_table(
        "device_events",
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("payload", sa.LargeBinary, nullable=False),              # the validated event JSON
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("handled_at", sa.Float),                                  # applied by the controller
        sa.Column("handled_token", sa.BigInteger),                          # the leader's fencing token
    )
    op.create_index("device_events_open", "device_events", ["handled_at", "received_at"])
    op.create_index("rollout_progress_device", "rollout_progress", ["device_id"])
