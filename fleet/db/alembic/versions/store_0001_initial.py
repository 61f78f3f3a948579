"""Store migration 1 of the old runner: the initial schema (models, versions, devices, credentials, audit,
idempotency keys, rollouts), with the two triggers that keep a model version immutable.

SQLite refuses with `RAISE(ABORT)`; PostgreSQL with a plpgsql trigger function raising SQLSTATE
23000 (integrity_constraint_violation), so both reach the fleet as the same `Conflict`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "store_0001"
down_revision = None
branch_labels = ("store",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("description", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
    )

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Text, primary_key=True),  # "<model>:<version>"
        sa.Column("model_name", sa.Text, sa.ForeignKey("models.name", ondelete="RESTRICT"), nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("artifact_digest", sa.Text, nullable=False),
        sa.Column("bundle_target", sa.Text),
        sa.Column("runtime", sa.Text, sa.CheckConstraint("runtime IN ('onnx', 'tflite')"), nullable=False),
        sa.Column("lineage", sa.Text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("stage", sa.Text, sa.CheckConstraint(
            "stage IN ('registered', 'staging', 'canary', 'production', 'archived')"),
            nullable=False, server_default=sa.text("'registered'")),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.UniqueConstraint("model_name", "version"),
    )

    op.create_table(
        "stage_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("version_id", sa.Text, sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("from_stage", sa.Text),
        sa.Column("to_stage", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("at", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("stage_history_version", "stage_history", ["version_id", "id"])

    op.create_table(
        "devices",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("labels", sa.Text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("agent_version", sa.Text),
        sa.Column("runtimes", sa.Text, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("architecture", sa.Text),
        sa.Column("memory_mb", sa.Integer),
        sa.Column("last_seen", sa.Text),
        sa.Column("online", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("reported_state", sa.Text),
        sa.Column("revoked", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("revoked_at", sa.Text),
        sa.Column("enrolled_at", sa.Text, nullable=False),
        sa.Column("broker_username", sa.Text, nullable=False, unique=True),
        sa.Column("broker_password_hash", sa.Text, nullable=False),
    )

    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("token_hash", sa.Text, nullable=False, unique=True),
        sa.Column("labels", sa.Text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Text, nullable=False),
        sa.Column("used_at", sa.Text),
        sa.Column("device_id", sa.Text),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("key_hash", sa.Text, nullable=False, unique=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("role", sa.Text, sa.CheckConstraint("role IN ('admin', 'operator', 'viewer')"),
                  nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("revoked", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("revoked_at", sa.Text),
    )

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("before", sa.Text),
        sa.Column("after", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index("audit_log_resource", "audit_log", ["resource", "id"])

    op.create_table(
        "idempotency_keys",
        sa.Column("actor", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("route", sa.Text, nullable=False),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
    )

    op.create_table(
        "rollouts",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("model_version_id", sa.Text, sa.ForeignKey("model_versions.id", ondelete="RESTRICT"),
                  nullable=False),
        sa.Column("selector", sa.Text, nullable=False),
        sa.Column("strategy", sa.Text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("thresholds", sa.Text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("desired", sa.Text, nullable=False, server_default=sa.text("'run'")),
        sa.Column("stage", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("history", sa.Text, nullable=False, server_default=sa.text("'[]'")),
    )

    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.Text, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Text, nullable=False),
    )
    op.create_index("rollout_devices_status", "rollout_devices", ["rollout_id", "status"])

    _triggers()


IMMUTABLE_COLUMNS = "id, model_name, version, artifact_digest, runtime, lineage, created_at"

SQLITE_TRIGGERS = (
    f"""CREATE TRIGGER model_versions_immutable
    BEFORE UPDATE OF {IMMUTABLE_COLUMNS}
    ON model_versions
    BEGIN
        SELECT RAISE(ABORT, 'model versions are immutable');
    END""",
    """CREATE TRIGGER model_versions_bundle_once
    BEFORE UPDATE OF bundle_target ON model_versions
    WHEN OLD.bundle_target IS NOT NULL AND NEW.bundle_target IS NOT OLD.bundle_target
    BEGIN
        SELECT RAISE(ABORT, 'bundle target of a model version is set only once');
    END""",
)

POSTGRES_TRIGGERS = (
    """CREATE FUNCTION model_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'model versions are immutable' USING ERRCODE = 'integrity_constraint_violation';
    END $$""",
    f"""CREATE TRIGGER model_versions_immutable
    BEFORE UPDATE OF {IMMUTABLE_COLUMNS} ON model_versions
    FOR EACH ROW EXECUTE FUNCTION model_versions_immutable()""",
    """CREATE FUNCTION model_versions_bundle_once() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'bundle target of a model version is set only once'
            USING ERRCODE = 'integrity_constraint_violation';
    END $$""",
    """CREATE TRIGGER model_versions_bundle_once
    BEFORE UPDATE OF bundle_target ON model_versions
    FOR EACH ROW WHEN (OLD.bundle_target IS NOT NULL AND NEW.bundle_target IS DISTINCT FROM OLD.bundle_target)
    EXECUTE FUNCTION model_versions_bundle_once()""",
)


def _triggers() -> None:
    """A version's identity never changes: only its stage moves (and the bundle target is set once).

    Both dialects fire on `UPDATE OF` the listed columns, whether or not the value changes, as
    the old runner's SQLite triggers did."""
    for ddl in POSTGRES_TRIGGERS if op.get_bind().dialect.name == "postgresql" else SQLITE_TRIGGERS:
        op.execute(ddl)
