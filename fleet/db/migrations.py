"""Ordered, idempotent schema migrations for the fleet store.

Each migration is a function over a `sqlite_utils.Database`, applied once inside its own
transaction and recorded in `schema_migrations`; re-running `migrate()` applies only the
ones missing, so start-up can always call it. Never edit a released migration: append one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]


def _m001_initial(db: sqlite_utils.Database) -> None:
    _script(
        db,
        """
        CREATE TABLE models (
            name TEXT PRIMARY KEY,
            description TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL
        );
        CREATE TABLE model_versions (
            id TEXT PRIMARY KEY,                  -- "<model>:<version>"
            model_name TEXT NOT NULL REFERENCES models(name) ON DELETE RESTRICT,
            version TEXT NOT NULL,
            artifact_digest TEXT NOT NULL,        -- "sha256:<hex>" of the model file
            bundle_target TEXT,                   -- TUF target path; set once when built
            runtime TEXT NOT NULL CHECK (runtime IN ('onnx', 'tflite')),
            lineage TEXT NOT NULL DEFAULT '{}',   -- JSON: code ref, dataset ref+digest, params, metrics
            stage TEXT NOT NULL DEFAULT 'registered'
                CHECK (stage IN ('registered', 'staging', 'canary', 'production', 'archived')),
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            UNIQUE (model_name, version)
        );
        -- A version's identity never changes: only its stage moves (and the bundle target is set once).
        CREATE TRIGGER model_versions_immutable
        BEFORE UPDATE OF id, model_name, version, artifact_digest, runtime, lineage, created_at
        ON model_versions
        BEGIN
            SELECT RAISE(ABORT, 'model versions are immutable');
        END;
        CREATE TRIGGER model_versions_bundle_once
        BEFORE UPDATE OF bundle_target ON model_versions
        WHEN OLD.bundle_target IS NOT NULL AND NEW.bundle_target IS NOT OLD.bundle_target
        BEGIN
            SELECT RAISE(ABORT, 'bundle target of a model version is set only once');
        END;
        CREATE TABLE stage_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            version_id TEXT NOT NULL REFERENCES model_versions(id) ON DELETE CASCADE,
            from_stage TEXT,
            to_stage TEXT NOT NULL,
            actor TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            at TEXT NOT NULL
        );
        CREATE INDEX stage_history_version ON stage_history(version_id, id);
        CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            labels TEXT NOT NULL DEFAULT '{}',
            agent_version TEXT,
            runtimes TEXT NOT NULL DEFAULT '[]',
            architecture TEXT,
            memory_mb INTEGER,
            last_seen TEXT,
            online INTEGER NOT NULL DEFAULT 0,
            reported_state TEXT,
            revoked INTEGER NOT NULL DEFAULT 0,
            revoked_at TEXT,
            enrolled_at TEXT NOT NULL,
            broker_username TEXT NOT NULL UNIQUE,
            broker_password_hash TEXT NOT NULL    -- Mosquitto PBKDF2-SHA512 ($7$) line value
        );
        CREATE TABLE enrollment_tokens (
            id TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,      -- sha256 of a 256-bit random token
            labels TEXT NOT NULL DEFAULT '{}',
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            used_at TEXT,
            device_id TEXT
        );
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,        -- sha256 of a 256-bit random key
            name TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            revoked INTEGER NOT NULL DEFAULT 0,
            revoked_at TEXT
        );
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            resource TEXT NOT NULL,
            before TEXT,
            after TEXT
        );
        CREATE INDEX audit_log_resource ON audit_log(resource, id);
        CREATE TABLE idempotency_keys (
            actor TEXT NOT NULL,
            key TEXT NOT NULL,
            route TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            status_code INTEGER NOT NULL,
            response TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (actor, key)
        );
        CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            model_version_id TEXT NOT NULL REFERENCES model_versions(id) ON DELETE RESTRICT,
            selector TEXT NOT NULL,
            strategy TEXT NOT NULL DEFAULT '{}',
            thresholds TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL DEFAULT 'pending',   -- written by the rollout controller
            desired TEXT NOT NULL DEFAULT 'run',     -- operator intent: run | pause | abort
            stage INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            history TEXT NOT NULL DEFAULT '[]'
        );
        CREATE TABLE rollout_devices (
            rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
            device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
            stage INTEGER NOT NULL,
            status TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (rollout_id, device_id)
        );
        CREATE INDEX rollout_devices_status ON rollout_devices(rollout_id, status);
        """
    )


def _m002_rollout_controller(db: sqlite_utils.Database) -> None:
    """The rollout controller's own durable state (fleet/rollouts/controller.py) and A/B experiments."""
    _script(
        db,
        """
        CREATE TABLE rollout_runtime (              -- one row per rollout the controller has seen
            rollout_id TEXT PRIMARY KEY REFERENCES rollouts(id) ON DELETE CASCADE,
            phase TEXT NOT NULL,                    -- forward | rollback | done
            target_bundle TEXT NOT NULL,            -- bundle id (name-version) being rolled out
            target_path TEXT NOT NULL,              -- its TUF target path
            started_at REAL NOT NULL,               -- clock seconds
            stage_started_at REAL NOT NULL,
            stage_done_at REAL,                     -- every device of the stage final (bake starts)
            breach TEXT NOT NULL DEFAULT '[]',      -- JSON: last gate breaches
            final_state TEXT                        -- state to reach once the rollback phase ends
        );
        CREATE TABLE rollout_progress (             -- per device, beside rollout_devices
            rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
            device_id TEXT NOT NULL,
            ordinal TEXT NOT NULL,                  -- sha256(rollout:device): stable canary order
            from_bundle TEXT,                       -- what the device ran when assigned
            assigned_at REAL,                       -- forward document published
            acked INTEGER NOT NULL DEFAULT 0,       -- device accepted the current document
            outcome TEXT,                           -- succeeded | install_failed | local_rollback |
                                                    -- timeout | reverted | revert_failed | skipped
            revert_at REAL,                         -- rollback document published
            detail TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (rollout_id, device_id)
        );
        CREATE INDEX rollout_progress_order ON rollout_progress(rollout_id, ordinal);
        CREATE TABLE rollout_commands (             -- operator commands beyond `desired`
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
            command TEXT NOT NULL CHECK (command IN ('promote', 'rollback', 'cancel')),
            actor TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            done_at TEXT
        );
        CREATE TABLE experiments (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            model_name TEXT NOT NULL,
            version_a TEXT NOT NULL,                -- model version ids (<model>:<version>)
            version_b TEXT NOT NULL,
            selector TEXT NOT NULL,
            split_b REAL NOT NULL,                  -- share of the cohort in arm B (0..1)
            metrics TEXT NOT NULL DEFAULT '[]',     -- JSON list of metric names
            min_samples INTEGER NOT NULL,
            alpha REAL NOT NULL,
            state TEXT NOT NULL,                    -- running | stopped
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL,
            started_at REAL NOT NULL
        );
        CREATE TABLE experiment_observations (      -- per-arm samples pushed by telemetry or tools
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
            arm TEXT NOT NULL CHECK (arm IN ('a', 'b')),
            metric TEXT NOT NULL,
            value REAL NOT NULL,
            weight INTEGER NOT NULL DEFAULT 1
        );
        CREATE INDEX experiment_observations_arm ON experiment_observations(experiment_id, metric, arm);
        """
    )


def _m003_experiment_devices(db: sqlite_utils.Database) -> None:
    """Which arm each device of an A/B experiment runs, and when its document went out."""
    _script(
        db,
        """
        CREATE TABLE experiment_devices (
            experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
            device_id TEXT NOT NULL,
            arm TEXT NOT NULL CHECK (arm IN ('a', 'b')),
            assigned_at REAL,
            PRIMARY KEY (experiment_id, device_id)
        );
        """
    )


def _m004_shadow_agreement(db: sqlite_utils.Database) -> None:
    """A rollout's shadow agreement (weighted sum and count), so the shadow gate's evidence
    survives a fleet restart like every other gate's (it used to live in the controller's memory)."""
    _script(
        db,
        """
        ALTER TABLE rollout_runtime ADD COLUMN shadow_agreement_sum REAL NOT NULL DEFAULT 0;
        ALTER TABLE rollout_runtime ADD COLUMN shadow_compared REAL NOT NULL DEFAULT 0;
        """
    )


def _m005_experiment_sequential(db: sqlite_utils.Database) -> None:
    """Device-level, always-valid A/B tests (issue 19): devices per arm before any verdict, the
    effect of interest per metric, and each metric's sequential test state. The state is what
    makes reading an experiment again harmless: the always-valid p-value is the running minimum
    over reads and the confidence sequence their intersection, so a verdict never flips back."""
    _script(
        db,
        """
        ALTER TABLE experiments ADD COLUMN min_devices INTEGER NOT NULL DEFAULT 10;
        ALTER TABLE experiments ADD COLUMN taus TEXT NOT NULL DEFAULT '{}';  -- JSON metric -> tau
        CREATE TABLE experiment_sequential (
            experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
            metric TEXT NOT NULL,
            p_value REAL NOT NULL,                  -- running minimum of the always-valid p-value
            ci_low REAL NOT NULL,                   -- running intersection of the confidence sequence
            ci_high REAL NOT NULL,
            tau REAL NOT NULL,                      -- the mixing scale, fixed at the first counted read
            updated_at REAL NOT NULL,
            PRIMARY KEY (experiment_id, metric)
        );
        """
    )


def _m010_rollout_approval(db: sqlite_utils.Database) -> None:
    """Site policies (issue 15): the last stage an operator approved and since when the rollout
    waits for the current one (its approval timeout counts from there); per device, when it
    last reported a hold (waiting for its window, or short of resources), from which its
    install timeout counts again; and `approve` among the queued operator commands."""
    _script(
        db,
        """
        ALTER TABLE rollout_runtime ADD COLUMN approved_stage INTEGER NOT NULL DEFAULT -1;
        ALTER TABLE rollout_runtime ADD COLUMN approval_requested_at REAL;
        ALTER TABLE rollout_progress ADD COLUMN hold_seen_at REAL;
        -- the `approve` command: the CHECK lives in the table, so the table is rebuilt
        CREATE TABLE rollout_commands_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
            command TEXT NOT NULL CHECK (command IN ('promote', 'rollback', 'cancel', 'approve')),
            actor TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            done_at TEXT
        );
        INSERT INTO rollout_commands_new (id, rollout_id, command, actor, note, created_at, done_at)
            SELECT id, rollout_id, command, actor, note, created_at, done_at FROM rollout_commands;
        DROP TABLE rollout_commands;
        ALTER TABLE rollout_commands_new RENAME TO rollout_commands;
        """
    )


MIGRATIONS: list[tuple[int, str, Migration]] = [
    (1, "initial schema", _m001_initial),
    (2, "rollout controller and experiments", _m002_rollout_controller),
    (3, "experiment devices", _m003_experiment_devices),
    (4, "shadow agreement in the rollout runtime", _m004_shadow_agreement),
    (5, "experiment sequential tests", _m005_experiment_sequential),
    (10, "rollout site policies", _m010_rollout_approval),
]


def applied_versions(db: sqlite_utils.Database) -> set[int]:
    """Migration numbers already recorded in this database."""
    if "schema_migrations" not in db.table_names():
        return set()
    return {int(row["version"]) for row in db.query("SELECT version FROM schema_migrations")}


def migrate(db: sqlite_utils.Database) -> list[int]:
    """Apply every missing migration in order; return the numbers applied (empty when current).

    Each migration and its bookkeeping row commit together (`db.atomic()`), so a crash
    mid-way leaves the database at the previous version rather than half-migrated.
    """
    with db.atomic():
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
    applied: list[int] = []
    for version, name, func in MIGRATIONS:
        with db.atomic():
            if version in applied_versions(db):
                continue
            func(db)
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, datetime.now(UTC).isoformat()),
            )
        applied.append(version)
    return applied


def _script(db: sqlite_utils.Database, sql: str) -> None:
    """Run several statements inside the caller's transaction.

    `executescript` would COMMIT first, so split with sqlite3's `complete_statement`,
    which knows that a trigger body's inner semicolons do not end the statement.
    """
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            db.execute(buf)
            buf = ""
    if buf.strip():
        db.execute(buf)
