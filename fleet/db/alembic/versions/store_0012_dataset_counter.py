"""Store migration 12: dataset chunks are signed device reports too (issue 13 x issue 14).

Dataset chunks (`.../devices/<id>/dataset`) carry the device's report signature like reported
state, events and telemetry (`agent.contract.report_auth`, kind `dataset`); their counters are
claimed in `device_report_seen` like the other kinds', above a per-device floor, which is this
new column of `device_report_keys` (`fleet.devices.report_keys`). Existing keys start at 0.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0012"
down_revision = "store_0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("device_report_keys", sa.Column("dataset_counter", sa.BigInteger, nullable=False,
                                                  server_default=sa.text("0")))


def downgrade() -> None:
    op.drop_column("device_report_keys", "dataset_counter")
