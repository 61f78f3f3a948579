"""The `telemetry` group of `fleet.db.schema` (`telemetry.db` on SQLite).

Merged telemetry windows and the per-device totals, the serving figures, the dataset uploads
and versions, and the data collection requests. One module per group because each group is
one SQLite file (one `MetaData`, migrated by its own Alembic branch, `telemetry_*`).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import BigInteger, Column, Float, Integer, LargeBinary, Table, Text

TELEMETRY = sa.MetaData()

telemetry_windows = Table(
    "telemetry_windows", TELEMETRY,
    Column("model", Text, primary_key=True),
    Column("version", Text, primary_key=True),
    Column("cohort", Text, primary_key=True),
    Column("window_start", Float, primary_key=True),
    Column("payload", LargeBinary),
    Column("reports", Integer),
    Column("devices", Text),
    Column("device_count", Integer),
    Column("latency_kll", LargeBinary),
    Column("updated_at", Float),
)
telemetry_seen = Table(
    "telemetry_seen", TELEMETRY,
    Column("device_id", Text, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("received_at", Float),
    sa.Index("idx_telemetry_seen_received_at", "received_at"),
)
dataset_chunks = Table(  # uploads in flight (issue 13): a redelivered chunk is a duplicate key
    "dataset_chunks", TELEMETRY,
    Column("device_id", Text, primary_key=True),
    Column("upload_id", Text, primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("total", Integer, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("policy_id", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("received_at", Float, nullable=False),
)
dataset_versions = Table(
    "dataset_versions", TELEMETRY,
    Column("dataset_id", Text, primary_key=True),
    Column("policy_id", Text, nullable=False),
    Column("device_id", Text, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("columns", Integer, nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("provenance", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("archive", LargeBinary, nullable=False),
)
collections = Table(  # opt-in data collection requests (fleet/collection, telemetry_0004)
    "collections", TELEMETRY,
    Column("collection_id", Text, primary_key=True),
    Column("model", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("selector", Text, nullable=False),
    Column("policy", Text, nullable=False),
    Column("devices", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("closes_at", Float, nullable=False),
    Column("applied", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)
telemetry_device_totals = Table(
    "telemetry_device_totals", TELEMETRY,
    Column("device_id", Text, primary_key=True),
    Column("model", Text, primary_key=True),
    Column("version", Text, primary_key=True),
    Column("window_start", Float, primary_key=True),
    Column("requests", BigInteger),
    Column("errors", BigInteger),
    Column("latency_count", BigInteger),
    Column("latency_sum_ms", Float),
    sa.Index("idx_telemetry_device_totals_model_version_window_start", "model", "version", "window_start"),
)

_SERVING_FIGURES = (  # what fleet/telemetry/serving.py keeps per window and in total
    ("requests", BigInteger), ("errors", BigInteger), ("rejected", BigInteger), ("latency_sum_s", Float),
    ("latency_counts", LargeBinary), ("cpu_s", Float), ("rss_max_bytes", BigInteger), ("devices", Integer),
    ("updated_at", Float),
)
telemetry_serving = Table(  # serving figures per merged window (telemetry_0003)
    "telemetry_serving", TELEMETRY,
    Column("model", Text, primary_key=True),
    Column("version", Text, primary_key=True),
    Column("cohort", Text, primary_key=True),
    Column("window_start", Float, primary_key=True),
    *(Column(n, t) for n, t in _SERVING_FIGURES),
    sa.Index("idx_telemetry_serving_window_start", "window_start"),
)
telemetry_serving_totals = Table(  # the same figures since the store began: /metrics counters
    "telemetry_serving_totals", TELEMETRY,
    Column("model", Text, primary_key=True),
    Column("version", Text, primary_key=True),
    Column("cohort", Text, primary_key=True),
    *(Column(n, t) for n, t in _SERVING_FIGURES),
    Column("latest_window", Float),
)
