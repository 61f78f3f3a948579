"""Store migration 9: signed device reports (issue 14).

Each device's Ed25519 report key (registered at enrollment, or by an operator for a device
enrolled before keys) with a per-kind counter floor; the counters accepted since (claimed with
`INSERT ... ON CONFLICT DO NOTHING`, so a replayed report is refused whichever ingest worker
gets it: `fleet.devices.report_keys`); and per device whether its stored reported state was
signed.
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
    op.create_table(
        "device_report_seen",
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("counter", sa.BigInteger, primary_key=True),
        sa.Column("received_at", sa.Float, nullable=False),
    )
    op.create_index("device_report_seen_received", "device_report_seen", ["received_at"])


def downgrade() -> None:
    op.drop_table("device_report_seen")
    op.drop_table("device_report_keys")
    op.drop_column("devices", "reported_signed")
