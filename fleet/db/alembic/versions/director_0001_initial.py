"""Director sequences: the last sequence issued per addressee (`device:<id>` / `cohort:<name>`).

The table used to be `sequences` in `director.sqlite`; on such a file its rows are copied into
`director_sequences` (same transaction) and the old table dropped, so no sequence is reused.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "director_0001"
down_revision = None
branch_labels = ("director",)
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "director_sequences",
        sa.Column("addressee", sa.Text, primary_key=True),
        sa.Column("sequence", sa.BigInteger, nullable=False),
    )
    if bind.dialect.name == "sqlite" and "sequences" in sa.inspect(bind).get_table_names():
        op.execute("INSERT INTO director_sequences (addressee, sequence) "
                   "SELECT addressee, coalesce(sequence, 0) FROM sequences")
        op.drop_table("sequences")
