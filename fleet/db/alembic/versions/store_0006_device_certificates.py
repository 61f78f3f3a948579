"""Store migration 6: certificate-based device identity (issue 18).

How each device authenticates to the broker (`password` or `cert`) and the certificate the
device CA issued it at enrollment. The CRL lists the serials of revoked devices'
certificates, so a certificate is revoked exactly when its device is; the unique serial keeps
one certificate from naming two devices.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0006"
down_revision = "store_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("identity", sa.Text, nullable=False,
                                       server_default=sa.text("'password'")))
    op.add_column("devices", sa.Column("cert_serial", sa.Text))        # lower-case hex
    op.add_column("devices", sa.Column("cert_fingerprint", sa.Text))   # "sha256:<hex>" of the DER
    op.add_column("devices", sa.Column("cert_not_after", sa.Text))     # ISO 8601 UTC
    op.create_index("devices_cert_serial", "devices", ["cert_serial"], unique=True)
