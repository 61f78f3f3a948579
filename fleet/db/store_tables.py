"""The `store` group of `fleet.db.schema`: the fleet store (`fleet.db` on SQLite).

Models and versions, devices and their keys, access (API keys, enrollment tokens, audit,
idempotency), rollouts and experiments with the controller's state, the leader lease and the
stored device events, training jobs. One module per group because each group is one SQLite file
(one `MetaData`, migrated by its own Alembic branch, `store_*`); types follow the rules in
`fleet.db.schema`, and a store test checks that a migrated database and these declarations agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import BigInteger, Column, Float, ForeignKey, Integer, LargeBinary, Table, Text

STORE = sa.MetaData()


def _d(sql: str) -> sa.TextClause:
    return sa.text(sql)


def _autoid() -> Column[int]:
    return Column("id", Integer, primary_key=True, autoincrement=True)


# -- migrations 1-5 of the old runner, then the store_* revisions --------------------------------
models = Table(
    "models", STORE,
    Column("name", Text, primary_key=True),
    Column("description", Text, nullable=False, server_default=_d("''")),
    Column("created_at", Text, nullable=False),
    Column("created_by", Text, nullable=False),
)
model_versions = Table(
    "model_versions", STORE,
    Column("id", Text, primary_key=True),  # "<model>:<version>"
    Column("model_name", Text, ForeignKey("models.name", ondelete="RESTRICT"), nullable=False),
    Column("version", Text, nullable=False),
    Column("artifact_digest", Text, nullable=False),
    Column("bundle_target", Text),
    Column("runtime", Text, sa.CheckConstraint("runtime IN ('onnx', 'tflite')"), nullable=False),
    Column("lineage", Text, nullable=False, server_default=_d("'{}'")),
    Column("stage", Text, sa.CheckConstraint(
        "stage IN ('registered', 'staging', 'canary', 'production', 'archived')"),
        nullable=False, server_default=_d("'registered'")),
    Column("created_at", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    sa.UniqueConstraint("model_name", "version"),
)
stage_history = Table(
    "stage_history", STORE,
    _autoid(),
    Column("version_id", Text, ForeignKey("model_versions.id", ondelete="CASCADE"), nullable=False),
    Column("from_stage", Text),
    Column("to_stage", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("note", Text, nullable=False, server_default=_d("''")),
    Column("at", Text, nullable=False),
    sa.Index("stage_history_version", "version_id", "id"),
    sqlite_autoincrement=True,
)
devices = Table(
    "devices", STORE,
    Column("id", Text, primary_key=True),
    Column("labels", Text, nullable=False, server_default=_d("'{}'")),
    Column("agent_version", Text),
    Column("runtimes", Text, nullable=False, server_default=_d("'[]'")),
    Column("architecture", Text),
    Column("memory_mb", Integer),
    Column("last_seen", Text),
    Column("online", Integer, nullable=False, server_default=_d("0")),
    Column("reported_state", Text),
    Column("revoked", Integer, nullable=False, server_default=_d("0")),
    Column("revoked_at", Text),
    Column("enrolled_at", Text, nullable=False),
    Column("broker_username", Text, nullable=False, unique=True),
    Column("broker_password_hash", Text, nullable=False),
    Column("identity", Text, nullable=False, server_default=_d("'password'")),  # password | cert
    Column("cert_serial", Text),
    Column("cert_fingerprint", Text),
    Column("cert_not_after", Text),
    Column("reported_signed", Integer, nullable=False, server_default=_d("0")),  # store_0009: by its key
    sa.Index("devices_cert_serial", "cert_serial", unique=True),
)
enrollment_tokens = Table(
    "enrollment_tokens", STORE,
    Column("id", Text, primary_key=True),
    Column("token_hash", Text, nullable=False, unique=True),
    Column("labels", Text, nullable=False, server_default=_d("'{}'")),
    Column("created_by", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("expires_at", Text, nullable=False),
    Column("used_at", Text),
    Column("device_id", Text),
)
api_keys = Table(
    "api_keys", STORE,
    Column("id", Text, primary_key=True),
    Column("key_hash", Text, nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("role", Text, sa.CheckConstraint("role IN ('admin', 'operator', 'viewer')"), nullable=False),
    Column("created_at", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("revoked", Integer, nullable=False, server_default=_d("0")),
    Column("revoked_at", Text),
)
audit_log = Table(
    "audit_log", STORE,
    _autoid(),
    Column("at", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("resource", Text, nullable=False),
    Column("before", Text),
    Column("after", Text),
    sa.Index("audit_log_resource", "resource", "id"),
    sqlite_autoincrement=True,
)
idempotency_keys = Table(
    "idempotency_keys", STORE,
    Column("actor", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("route", Text, nullable=False),
    Column("request_hash", Text, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response", Text, nullable=False),
    Column("created_at", Text, nullable=False),
)
rollouts = Table(
    "rollouts", STORE,
    Column("id", Text, primary_key=True),
    Column("model_version_id", Text, ForeignKey("model_versions.id", ondelete="RESTRICT"), nullable=False),
    Column("selector", Text, nullable=False),
    Column("strategy", Text, nullable=False, server_default=_d("'{}'")),
    Column("thresholds", Text, nullable=False, server_default=_d("'{}'")),
    Column("state", Text, nullable=False, server_default=_d("'pending'")),
    Column("desired", Text, nullable=False, server_default=_d("'run'")),
    Column("stage", Integer, nullable=False, server_default=_d("0")),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("history", Text, nullable=False, server_default=_d("'[]'")),
)
rollout_devices = Table(
    "rollout_devices", STORE,
    Column("rollout_id", Text, ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
    Column("device_id", Text, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("stage", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    sa.Index("rollout_devices_status", "rollout_id", "status"),
)
rollout_runtime = Table(
    "rollout_runtime", STORE,
    Column("rollout_id", Text, ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
    Column("phase", Text, nullable=False),
    Column("target_bundle", Text, nullable=False),
    Column("target_path", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("stage_started_at", Float, nullable=False),
    Column("stage_done_at", Float),
    Column("breach", Text, nullable=False, server_default=_d("'[]'")),
    Column("final_state", Text),
    Column("shadow_agreement_sum", Float, nullable=False, server_default=_d("0")),  # migration 4
    Column("shadow_compared", Float, nullable=False, server_default=_d("0")),
    Column("approved_stage", Integer, nullable=False, server_default=_d("-1")),  # store_0008
    Column("approval_requested_at", Float),
)
rollout_progress = Table(
    "rollout_progress", STORE,
    Column("rollout_id", Text, ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
    Column("device_id", Text, primary_key=True),
    Column("ordinal", Text, nullable=False),
    Column("from_bundle", Text),
    Column("assigned_at", Float),
    Column("acked", Integer, nullable=False, server_default=_d("0")),
    Column("outcome", Text),
    Column("revert_at", Float),
    Column("detail", Text, nullable=False, server_default=_d("''")),
    Column("hold_seen_at", Float),  # store_0008
    sa.Index("rollout_progress_order", "rollout_id", "ordinal"),
    sa.Index("rollout_progress_device", "device_id"),  # a device's entries across rollouts (store_0007)
)
rollout_commands = Table(
    "rollout_commands", STORE,
    _autoid(),
    Column("rollout_id", Text, ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=False),
    Column("command", Text, sa.CheckConstraint("command IN ('promote', 'rollback', 'cancel', 'approve')"),
           nullable=False),
    Column("actor", Text, nullable=False),
    Column("note", Text, nullable=False, server_default=_d("''")),
    Column("created_at", Text, nullable=False),
    Column("done_at", Text),
    sqlite_autoincrement=True,
)
experiments = Table(
    "experiments", STORE,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("model_name", Text, nullable=False),
    Column("version_a", Text, nullable=False),
    Column("version_b", Text, nullable=False),
    Column("selector", Text, nullable=False),
    Column("split_b", Float, nullable=False),
    Column("metrics", Text, nullable=False, server_default=_d("'[]'")),
    Column("min_samples", Integer, nullable=False),
    Column("alpha", Float, nullable=False),
    Column("state", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("min_devices", Integer, nullable=False, server_default=_d("10")),  # migration 5
    Column("taus", Text, nullable=False, server_default=_d("'{}'")),
)
experiment_observations = Table(
    "experiment_observations", STORE,
    _autoid(),
    Column("experiment_id", Text, ForeignKey("experiments.id", ondelete="CASCADE"), nullable=False),
    Column("arm", Text, sa.CheckConstraint("arm IN ('a', 'b')"), nullable=False),
    Column("metric", Text, nullable=False),
    Column("value", Float, nullable=False),
    Column("weight", Integer, nullable=False, server_default=_d("1")),
    sa.Index("experiment_observations_arm", "experiment_id", "metric", "arm"),
    sqlite_autoincrement=True,
)
experiment_devices = Table(
    "experiment_devices", STORE,
    Column("experiment_id", Text, ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    Column("device_id", Text, primary_key=True),
    Column("arm", Text, sa.CheckConstraint("arm IN ('a', 'b')"), nullable=False),
    Column("assigned_at", Float),
)
experiment_sequential = Table(
    "experiment_sequential", STORE,
    Column("experiment_id", Text, ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    Column("metric", Text, primary_key=True),
    Column("p_value", Float, nullable=False),
    Column("ci_low", Float, nullable=False),
    Column("ci_high", Float, nullable=False),
    Column("tau", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

leases = Table(  # the leader lease of the controller and drift monitor (store_0007)
    "leases", STORE,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False, server_default=_d("''")),
    Column("fencing_token", BigInteger, nullable=False, server_default=_d("0")),
    Column("expires_at", Float, nullable=False, server_default=_d("0")),
)
device_events = Table(  # each device event once per (device, seq), whichever worker got it
    "device_events", STORE,
    Column("device_id", Text, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("payload", LargeBinary, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("handled_at", Float),
    Column("handled_token", BigInteger),
    sa.Index("device_events_open", "handled_at", "received_at"),
)
device_wrap_keys = Table(  # each device's X25519 key sealed bundles are wrapped for (store_0010)
    "device_wrap_keys", STORE,
    Column("device_id", Text, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("public_key", Text, nullable=False),  # base64 of the raw 32 bytes
    Column("key_id", Text, nullable=False),
    Column("created_at", Text, nullable=False),
)
device_report_keys = Table(  # each device's report key and the last counter accepted per kind (store_0009)
    "device_report_keys", STORE,
    Column("device_id", Text, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("public_key", Text, nullable=False),  # base64 of the raw 32-byte Ed25519 public key
    Column("registered_at", Float, nullable=False),
    Column("registered_by", Text, nullable=False),
    *(Column(f"{kind}_counter", BigInteger, nullable=False, server_default=_d("0"))
      for kind in ("reported", "events", "telemetry", "dataset")),  # dataset: store_0012
)
device_report_seen = Table(  # counters claimed per (device, kind) above its floor (store_0009)
    "device_report_seen", STORE,
    Column("device_id", Text, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("kind", Text, primary_key=True),
    Column("counter", BigInteger, primary_key=True),
    Column("received_at", Float, nullable=False),
    sa.Index("device_report_seen_received", "received_at"),
)

training_jobs = Table(  # training jobs (store_0011, fleet/training/jobs.py)
    "training_jobs", STORE,
    Column("id", Text, primary_key=True),
    Column("model", Text, nullable=False),
    Column("parent_version", Text, nullable=False),
    Column("cohort", Text, nullable=False, server_default=_d("''")),
    Column("trigger_alert_id", BigInteger, unique=True),
    Column("dataset_ids", Text, nullable=False, server_default=_d("'[]'")),
    Column("state", Text, nullable=False),
    Column("step", Text, nullable=False, server_default=_d("''")),
    Column("progress", Float, nullable=False, server_default=_d("0")),
    Column("attempts", Integer, nullable=False, server_default=_d("0")),
    Column("worker", Text, nullable=False, server_default=_d("''")),
    Column("cancel_requested", Integer, nullable=False, server_default=_d("0")),
    Column("approval", Text),
    Column("result_version", Text),
    Column("rollout_id", Text),
    Column("metrics", Text, nullable=False, server_default=_d("'{}'")),
    Column("error", Text, nullable=False, server_default=_d("''")),
    Column("history", Text, nullable=False, server_default=_d("'[]'")),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("created_by", Text, nullable=False),
    sa.Index("training_jobs_state", "state"),
)
training_logs = Table(
    "training_logs", STORE,
    Column("job_id", Text, ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("at", Float, nullable=False),
    Column("line", Text, nullable=False),
)
