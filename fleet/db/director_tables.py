"""The `director` group of `fleet.db.schema` (`director/director.sqlite` on SQLite): the
director's document sequence per addressee (`fleet.trust.director_signer`).

One module per group because each group is one SQLite file (one `MetaData`, migrated by its
own Alembic branch, `director_*`), even this one-table group: the signer opens it alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import BigInteger, Column, Table, Text

DIRECTOR = sa.MetaData()

director_sequences = Table(
    "director_sequences", DIRECTOR,
    Column("addressee", Text, primary_key=True),
    Column("sequence", BigInteger, nullable=False),
)
