-- A fleet.db as the old hand-written runner left it at migration 5 (with a few rows),
-- frozen so the Alembic adoption test has a real old file to open. Generated once, never edited.
BEGIN TRANSACTION;
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
INSERT INTO "audit_log" VALUES(1,'2026-01-01T00:00:00.000000Z','alice','model.create','models/m',NULL,'{"name":"m"}');
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
INSERT INTO "devices" VALUES('dev-1','{"env":"prod"}','0.1.0','[]',NULL,NULL,NULL,0,NULL,0,NULL,'2026-01-01T00:00:00.000000Z','dev-1','$7$x');
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
CREATE TABLE experiment_devices (
            experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
            device_id TEXT NOT NULL,
            arm TEXT NOT NULL CHECK (arm IN ('a', 'b')),
            assigned_at REAL,
            PRIMARY KEY (experiment_id, device_id)
        );
CREATE TABLE experiment_observations (      -- per-arm samples pushed by telemetry or tools
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            experiment_id TEXT NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
            arm TEXT NOT NULL CHECK (arm IN ('a', 'b')),
            metric TEXT NOT NULL,
            value REAL NOT NULL,
            weight INTEGER NOT NULL DEFAULT 1
        );
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
        , min_devices INTEGER NOT NULL DEFAULT 10, taus TEXT NOT NULL DEFAULT '{}');
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
INSERT INTO "model_versions" VALUES('m:1.0.0','m','1.0.0','sha256:0000000000000000000000000000000000000000000000000000000000000000','bundles/m-1.0.0.tar','onnx','{"metrics":{"acc":0.9}}','canary','2026-01-01T00:00:00.000000Z','alice');
CREATE TABLE models (
            name TEXT PRIMARY KEY,
            description TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL
        );
INSERT INTO "models" VALUES('m','old model','2026-01-01T00:00:00.000000Z','alice');
CREATE TABLE rollout_commands (             -- operator commands beyond `desired`
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
            command TEXT NOT NULL CHECK (command IN ('promote', 'rollback', 'cancel')),
            actor TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            done_at TEXT
        );
CREATE TABLE rollout_devices (
            rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
            device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
            stage INTEGER NOT NULL,
            status TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (rollout_id, device_id)
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
        , shadow_agreement_sum REAL NOT NULL DEFAULT 0, shadow_compared REAL NOT NULL DEFAULT 0);
INSERT INTO "rollout_runtime" VALUES('ro-1','forward','m-1.0.0','bundles/m-1.0.0.tar',1.5,1.5,NULL,'[]',NULL,0.0,0.0);
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
INSERT INTO "rollouts" VALUES('ro-1','m:1.0.0','env=prod','{}','{}','pending','run',0,'2026-01-01T00:00:00.000000Z','2026-01-01T00:00:00.000000Z','alice','[]');
CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL);
INSERT INTO "schema_migrations" VALUES(1,'initial schema','2026-01-01T00:00:00+00:00');
INSERT INTO "schema_migrations" VALUES(2,'rollout controller and experiments','2026-01-01T00:00:00+00:00');
INSERT INTO "schema_migrations" VALUES(3,'experiment devices','2026-01-01T00:00:00+00:00');
INSERT INTO "schema_migrations" VALUES(4,'shadow agreement in the rollout runtime','2026-01-01T00:00:00+00:00');
INSERT INTO "schema_migrations" VALUES(5,'experiment sequential tests','2026-01-01T00:00:00+00:00');
CREATE TABLE stage_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            version_id TEXT NOT NULL REFERENCES model_versions(id) ON DELETE CASCADE,
            from_stage TEXT,
            to_stage TEXT NOT NULL,
            actor TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            at TEXT NOT NULL
        );
INSERT INTO "stage_history" VALUES(1,'m:1.0.0',NULL,'registered','alice','registered','2026-01-01T00:00:00.000000Z');
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
CREATE INDEX stage_history_version ON stage_history(version_id, id);
CREATE INDEX audit_log_resource ON audit_log(resource, id);
CREATE INDEX rollout_devices_status ON rollout_devices(rollout_id, status);
CREATE INDEX rollout_progress_order ON rollout_progress(rollout_id, ordinal);
CREATE INDEX experiment_observations_arm ON experiment_observations(experiment_id, metric, arm);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('stage_history',1);
INSERT INTO "sqlite_sequence" VALUES('audit_log',1);
COMMIT;
