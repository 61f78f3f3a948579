"""Telemetry 3: the serving figures per model version and cohort (fleet/telemetry/serving.py).

`telemetry_serving` holds each merged window's requests, errors, rejected requests, latency
histogram (int64 little-endian bytes), CPU and peak RSS; `telemetry_serving_totals` the same
figures summed since the store began (the /metrics counters, exact across restarts). Both are
written in the flush that writes the windows. A telemetry.db whose tables the pre-Alembic
branch created at runtime is adopted as it is (only missing tables are created).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "telemetry_0003"
down_revision = "telemetry_0002"
branch_labels = None
depends_on = None


def _figures() -> list[sa.Column[object]]:
    return [
        sa.Column("requests", sa.BigInteger), sa.Column("errors", sa.BigInteger),
        sa.Column("rejected", sa.BigInteger), sa.Column("latency_sum_s", sa.Float),
        sa.Column("latency_counts", sa.LargeBinary), sa.Column("cpu_s", sa.Float),
        sa.Column("rss_max_bytes", sa.BigInteger), sa.Column("devices", sa.Integer),
        sa.Column("updated_at", sa.Float),
    ]


def upgrade() -> None:
    have = set(sa.inspect(op.get_bind()).get_table_names())
    if "telemetry_serving" not in have:
        op.create_table(
            "telemetry_serving",
            *(sa.Column(n, sa.Text, primary_key=True) for n in ("model", "version", "cohort")),
            sa.Column("window_start", sa.Float, primary_key=True), *_figures(),
        )
        op.create_index("idx_telemetry_serving_window_start", "telemetry_serving", ["window_start"])
    if "telemetry_serving_totals" not in have:
        op.create_table(
            "telemetry_serving_totals",
            *(sa.Column(n, sa.Text, primary_key=True) for n in ("model", "version", "cohort")),
            *_figures(), sa.Column("latest_window", sa.Float),
        )
