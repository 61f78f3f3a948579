"""Store migration 9: signed device reports (issue 14).

Each device's Ed25519 report key (registered at enrollment, or by an operator for a device
enrolled before keys) and, per message kind, the highest report counter the fleet accepted from
it; and per device whether its stored reported state was signed. Ingest workers advance a
counter with a conditional UPDATE (`... WHERE <kind>_counter < :counter`), so a replayed report
is refused whichever worker gets it (`fleet.devices.report_keys`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0009"
down_revision = "store_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Whether the stored reported state was signed by the device's key: rollouts count only those
    # (a state stored before this revision was not).
    op.add_column("devices", sa.Column("reported_signed", sa.Integer, nullable=False,
                                       server_default=sa.text("0")))
    op.create_table(
        "device_report_keys",
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("registered_by", sa.Text, nullable=False),
        *(sa.Column(f"{kind}_counter", sa.BigInteger, nullable=False, server_default=sa.text("0"))
          for kind in ("reported", "events", "telemetry")),
    )


def downgrade() -> None:
    op.drop_table("device_report_keys")
    op.drop_column("devices", "reported_signed")
