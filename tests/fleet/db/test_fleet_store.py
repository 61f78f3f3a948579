"""The fleet store on SQLite and PostgreSQL: migrations (and adopting the old runner's files), durability,
WAL, immutability, selectors, inventory, tokens."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fleet.access.auth import hash_secret
from fleet.db import migrate
from fleet.db.migrate import current, head
from fleet.db.store_tables import STORE
from fleet.devices.enrollment import create_enrollment_token, enroll_device, mosquitto_password_hash
from fleet.devices.selector import parse_selector
from fleet.errors import AuthError, Conflict, FleetInputError, FleetMisuseError, NotFound
from fleet.store import Store
from tests.support.broker import start_mosquitto
from tests.support.fakes import DIGEST, FakeClock
from tests.support.postgres import Backend

DATA = Path(__file__).with_name("data")


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = Store(backend.location("fleet.db"), clock=FakeClock())
    yield s
    s.close()


def _device(store: Store, device_id: str, labels: dict[str, str]) -> None:
    store.devices.create(device_id, labels, {"agent_version": "0.1.0"}, device_id, "$7$x", "test")


# every store revision, oldest first (each new revision joins this list by itself)
STORE_REVISIONS = sorted(
    r.revision for r in migrate.scripts().walk_revisions() if r.revision.startswith("store_"))


def _schema_diff(store: Store) -> list[object]:
    """What Alembic's autogenerate would change to make the database match `fleet.db.schema`."""
    with store.read() as db:
        return list(compare_metadata(MigrationContext.configure(db.conn), STORE))


def _sqlite_shape(path: Path) -> dict[str, object]:
    """What SQLite enforces of a file's schema, per table: columns (affinity, NOT NULL outside the
    primary key, default), primary key, foreign keys with their ON DELETE, indexes, triggers.
    (Alembic's reflection of old inline REFERENCES misses ON DELETE, so it cannot judge this.)"""
    conn = sqlite3.connect(path)
    affinity = {"FLOAT": "REAL", "BIGINT": "INTEGER"}
    out: dict[str, object] = {}
    skip = ("schema_migrations", "alembic_version", "sqlite_sequence")
    tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    names = [r[0] for r in tables if r[0] not in skip]
    for t in sorted(names):
        cols = [(c[1], affinity.get(c[2], c[2]), bool(c[3]) and not c[5], c[4], c[5])
                for c in conn.execute(f"PRAGMA table_info({t})")]
        fks = sorted((f[2], f[3], f[4], f[6]) for f in conn.execute(f"PRAGMA foreign_key_list({t})"))
        idx = sorted((i[1], i[2]) for i in conn.execute(f"PRAGMA index_list({t})") if i[3] == "c")
        out[t] = (cols, fks, idx)
    triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
    out["triggers"] = sorted(r[0] for r in triggers)
    conn.close()
    return out


@pytest.mark.integration
def test_migrations_run_once_and_make_the_declared_schema(backend: Backend) -> None:
    first = Store(backend.location())
    assert first.applied_migrations == STORE_REVISIONS
    assert _schema_diff(first) == []
    first.close()
    again = Store(backend.location())
    assert again.applied_migrations == []
    with again.read() as db:
        assert current(db.conn, "store") == head("store") == STORE_REVISIONS[-1]
    again.close()


@pytest.mark.integration
@pytest.mark.parametrize("version", [3, 5])
def test_a_fleet_db_of_the_old_runner_is_adopted_without_losing_a_row(tmp_path: Path, version: int) -> None:
    """A fleet.db the hand-written runner migrated to `version`: Alembic stamps it there, runs
    only the missing revisions, and every row (and the immutability triggers) survives."""
    path = tmp_path / "fleet.db"
    conn = sqlite3.connect(path)
    conn.executescript((DATA / f"fleet_db_runner_v{version}.sql").read_text())
    conn.close()
    store = Store(path)
    assert store.applied_migrations == STORE_REVISIONS[version:]
    fresh = Store(tmp_path / "fresh.db")
    assert _sqlite_shape(path) == _sqlite_shape(tmp_path / "fresh.db")
    fresh.close()
    v = store.models.get_version("m", "1.0.0")
    assert (v.stage, v.lineage, v.bundle_target) == ("canary", {"metrics": {"acc": 0.9}},
                                                     "bundles/m-1.0.0.tar")
    assert store.devices.get("dev-1").labels == {"env": "prod"}
    assert [e.action for e in store.audit.list(None, 10).items] == ["model.create"]
    assert store.rollouts.get("ro-1").selector == "env=prod"
    with pytest.raises(Conflict, match="immutable"):
        with store.tx() as db:
            db.execute("UPDATE model_versions SET artifact_digest = 'x' WHERE id = 'm:1.0.0'")
    store.models.create_model("m2", "", "bob")  # AUTOINCREMENT ids continue after the old rows
    assert [e.id for e in store.audit.list(None, 10).items] == [2, 1]
    store.close()
    assert Store(path).applied_migrations == []


@pytest.mark.integration
def test_a_file_that_is_not_a_database_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.db"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(FleetMisuseError, match="cannot open fleet database"):
        Store(bad)


@pytest.mark.integration
def test_an_unreachable_postgres_is_refused_without_the_password(tmp_path: Path) -> None:
    with pytest.raises(FleetMisuseError, match="cannot open fleet database") as caught:
        Store("postgresql://fleet:s3cret-pw@127.0.0.1:1/fleet?connect_timeout=2")
    assert "s3cret-pw" not in str(caught.value) and "***" in str(caught.value)


@pytest.mark.integration
def test_wal_foreign_keys_and_busy_timeout_are_on(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("foreign_keys") == 1
    assert store.pragma("busy_timeout") == 5000
    assert store.pragma("synchronous") == 2  # FULL
    assert store.pragma("secure_delete") == 1
    store.close()


@pytest.mark.integration
def test_foreign_keys_are_enforced_as_a_conflict(store: Store) -> None:
    with pytest.raises(Conflict, match="integrity"):
        with store.tx() as db:
            db.execute("INSERT INTO rollout_devices VALUES ('nope', 'nope', 0, 'pending', 'x')")


@pytest.mark.integration
def test_a_failed_nested_write_rolls_back_only_its_savepoint(store: Store) -> None:
    with store.tx():
        store.models.create_model("m", "", "alice")
        with pytest.raises(Conflict, match="already exists"):
            store.models.create_model("m", "", "alice")
        store.models.create_model("n", "", "alice")  # the outer transaction is still usable
    assert [m.name for m in store.models.list_models(None, 10).items] == ["m", "n"]
    with pytest.raises(RuntimeError), store.tx():
        store.models.create_model("o", "", "alice")
        raise RuntimeError("boom")
    assert [m.name for m in store.models.list_models(None, 10).items] == ["m", "n"]


@pytest.mark.integration
def test_restart_loses_nothing(backend: Backend) -> None:
    s = Store(backend.location())
    s.models.create_model("m", "d", "alice")
    s.models.register_version("m", "1.0.0", DIGEST, "onnx", {"metrics": {"acc": 0.9}}, "alice")
    _device(s, "dev-1", {"env": "prod"})
    s.devices.record_reported_state("dev-1", {"agent_version": "0.2.0", "runtimes": ["onnx"]})
    r = s.rollouts.create("m:1.0.0", "env=prod", {"stages": [1, 10]}, {"max_failure_rate": 0.1}, "alice")
    s.close()
    s2 = Store(backend.location())
    assert s2.models.get_version("m", "1.0.0").lineage == {"metrics": {"acc": 0.9}}
    dev = s2.devices.get("dev-1")
    assert (dev.agent_version, dev.runtimes, dev.online) == ("0.2.0", ["onnx"], True)
    assert s2.rollouts.get(r.id).strategy == {"stages": [1, 10]}
    assert len(s2.audit.list(None, 100).items) == 4  # model, version, device, rollout
    s2.close()


@pytest.mark.integration
def test_versions_are_immutable_and_stages_recorded(store: Store) -> None:
    store.models.create_model("m", "", "alice")
    store.models.register_version("m", "1.0.0", DIGEST, "onnx", {}, "alice")
    with pytest.raises(Conflict, match="immutable"):
        with store.tx() as db:
            db.execute("UPDATE model_versions SET artifact_digest = 'x' WHERE id = 'm:1.0.0'")
    with pytest.raises(Conflict):
        store.models.register_version("m", "1.0.0", DIGEST, "onnx", {}, "alice")
    with pytest.raises(FleetInputError, match="semantic"):
        store.models.register_version("m", "1.0", DIGEST, "onnx", {}, "alice")
    with pytest.raises(NotFound):
        store.models.register_version("nope", "1.0.0", DIGEST, "onnx", {}, "alice")
    store.models.set_stage("m", "1.0.0", "canary", "bob", "first canary")
    store.models.set_bundle_target("m", "1.0.0", "bundles/m-1.0.0.tar", "bob")
    with pytest.raises(Conflict):
        store.models.set_bundle_target("m", "1.0.0", "bundles/other.tar", "bob")
    with pytest.raises(Conflict, match="already"):
        store.models.set_stage("m", "1.0.0", "canary", "bob")
    store.models.set_stage("m", "1.0.0", "archived", "bob")
    with pytest.raises(Conflict, match="archived"):
        store.models.set_stage("m", "1.0.0", "production", "bob")
    hist = store.models.stage_history("m", "1.0.0")
    assert [(h.from_stage, h.to_stage, h.actor) for h in hist] == [
        (None, "registered", "alice"),
        ("registered", "canary", "bob"),
        ("canary", "archived", "bob"),
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    "text,labels,expected",
    [
        ("env=prod", {"env": "prod"}, True),
        ("env==prod", {"env": "dev"}, False),
        ("env!=prod", {}, True),
        ("region in (eu, us)", {"region": "us"}, True),
        ("region in (eu,us)", {"region": "ap"}, False),
        ("region notin (eu)", {}, True),
        ("gpu", {"gpu": ""}, True),
        ("!legacy", {"legacy": "1"}, False),
        ("env=prod,region in (eu,us),!legacy", {"env": "prod", "region": "eu"}, True),
        ("", {"x": "y"}, True),
    ],
)
def test_selector_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(text).matches(labels) is expected


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["env=", "=x", "region in ()", "a in (b", "a)", "env=pr od", ",", "k=v,,k2"])
def test_selector_rejects_bad_input(bad: str) -> None:
    with pytest.raises(FleetInputError):
        parse_selector(bad)


@pytest.mark.unit
@pytest.mark.parametrize("typo", ["site==", "site=", "site!=", "env=prod, site=="])
def test_selector_refuses_a_comparison_without_value(typo: str) -> None:
    # Legal in Kubernetes (an empty label), but a rollout to `site==` reached no device: refused.
    with pytest.raises(FleetInputError, match=r"no value after '(==|=|!=)'"):
        parse_selector(typo)


@pytest.mark.integration
def test_selector_sql_agrees_with_python(store: Store) -> None:
    label_sets = [
        {"env": "prod", "region": "eu"},
        {"env": "prod", "region": "us", "gpu": "yes"},
        {"env": "dev"},
        {},
        {"env": "prod", "legacy": "1", "region": "ap"},
    ]
    for i, labels in enumerate(label_sets):
        _device(store, f"dev-{i}", labels)
    for text in [
        "env=prod",
        "env!=prod",
        "region in (eu,us)",
        "region notin (eu)",
        "gpu",
        "!legacy",
        "env=prod,region notin (us),!gpu",
        "",
    ]:
        sel = parse_selector(text)
        want = [f"dev-{i}" for i, labels in enumerate(label_sets) if sel.matches(labels)]
        got = [d.id for d in store.devices.list_devices(sel, None, 100).items]
        assert got == want, text
        assert store.devices.ids_matching(sel) == want


@pytest.mark.integration
def test_reported_state_and_offline(store: Store) -> None:
    _device(store, "dev-1", {})
    with pytest.raises(NotFound):
        store.devices.record_reported_state("dev-x", {})
    with pytest.raises(FleetInputError, match="memory_mb"):
        store.devices.record_reported_state("dev-1", {"memory_mb": "lots"})
    state = {"architecture": "aarch64", "memory_mb": 512, "slot": "a"}
    row = store.devices.record_reported_state("dev-1", state)
    assert (row.architecture, row.memory_mb, row.online) == ("aarch64", 512, True)
    assert row.reported_state is not None and row.reported_state["slot"] == "a"
    from agent.contract.protocol import ReportedState

    report = ReportedState(
        device_id="dev-1",
        agent_version="0.3.0",
        runtimes=["onnx", "tflite"],
        memory_mb=300.4,
        labels={"env": "evil"},
        timestamp=1_800_000_000.0,
    )
    row = store.devices.record_reported_state("dev-1", report.model_dump(mode="json"))
    assert (row.agent_version, row.runtimes, row.memory_mb) == ("0.3.0", ["onnx", "tflite"], 300)
    assert row.architecture == "aarch64" and row.labels == {}  # empty fields and device labels ignored
    with pytest.raises(FleetInputError, match="claims"):
        store.devices.record_reported_state("dev-1", {"device_id": "dev-2"})
    store.devices.on_reported("dev-nope", report)  # the publisher callback logs and drops refusals
    lwt = store.devices.record_reported_state("dev-1", {"online": False})
    assert lwt.online is False
    store.devices.record_reported_state("dev-1", {})
    store.devices.mark_offline("dev-1")
    assert store.devices.get("dev-1").online is False
    store.devices.revoke("dev-1", "admin")
    with pytest.raises(FleetInputError, match="revoked"):
        store.devices.record_reported_state("dev-1", {})
    assert store.devices.broker_credentials() == []


@pytest.mark.integration
def test_enrollment_token_single_use_and_expiry(store: Store, tmp_path: Path) -> None:
    clock = store.clock
    assert isinstance(clock, FakeClock)
    _, token = create_enrollment_token(store, {"env": "prod"}, 600, "op")
    kw = {
        "broker_url": "mqtt://b",
        "topic_prefix": "edgefleet",
        "repo_dir": tmp_path / "repo",
        "passwd_path": tmp_path / "passwd",
    }
    out = enroll_device(store, token, {"agent_version": "1.0.0"}, **kw)
    assert store.devices.get(out["device_id"]).labels == {"env": "prod"}
    assert out["tuf_root"] is None
    with pytest.raises(AuthError, match="already used"):
        enroll_device(store, token, {}, **kw)
    _, late = create_enrollment_token(store, {}, 600, "op")
    clock.advance(601)
    with pytest.raises(AuthError, match="expired"):
        enroll_device(store, late, {}, **kw)
    with pytest.raises(AuthError, match="unknown"):
        store.access.consume_token(hash_secret("eft_nope"), "dev-z")
    assert store.devices.count() == 1  # failed enrollments created nothing


@pytest.mark.integration
def test_rollout_intent_transitions(store: Store) -> None:
    store.models.create_model("m", "", "a")
    store.models.register_version("m", "1.0.0", DIGEST, "onnx", {}, "a")
    r = store.rollouts.create("m:1.0.0", "env = prod", {}, {}, "a")
    assert (r.state, r.desired, r.selector) == ("pending", "run", "env=prod")
    with pytest.raises(Conflict, match="not paused"):
        store.rollouts.request(r.id, "resume", "a")
    assert store.rollouts.request(r.id, "pause", "a").desired == "pause"
    assert store.rollouts.request(r.id, "resume", "a").desired == "run"
    assert store.rollouts.request(r.id, "abort", "a").state == "pending"  # nothing acted yet
    with pytest.raises(Conflict):
        store.rollouts.request(r.id, "pause", "a")
    _device(store, "dev-1", {"env": "prod"})
    store.rollouts.set_device_status(r.id, "dev-1", 1, "downloading")
    store.rollouts.set_state(r.id, "aborted", 1, "controller")
    st = store.rollouts.status(r.id)
    assert (st.state, st.devices_total, st.devices_by_status) == ("aborted", 1, {"downloading": 1})
    store.models.set_stage("m", "1.0.0", "archived", "a")
    with pytest.raises(Conflict, match="archived"):
        store.rollouts.create("m:1.0.0", "", {}, {}, "a")


@pytest.mark.integration
def test_mosquitto_accepts_generated_password_file(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"dev-1:{mosquitto_password_hash('s3cret')}\n")
    passwd.chmod(0o600)
    # `user root`: the test runs as root and its tmp dir is 0700, so the broker must not drop privileges.
    conf = f"password_file {passwd}\nuser root\n"
    broker = start_mosquitto(tmp_path / "b", extra_conf=conf, allow_anonymous=False)
    try:
        results = {}
        for password in ("s3cret", "wrong"):
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1", protocol=mqtt.MQTTv5)
            client.username_pw_set("dev-1", password)
            codes: list[ReasonCode] = []
            client.on_connect = lambda c, u, f, rc, p, codes=codes: codes.append(rc)
            client.connect(broker.host, broker.port)
            for _ in range(100):
                client.loop(timeout=0.05)
                if codes:
                    break
            client.disconnect()
            results[password] = codes[0].is_failure if codes else None
        assert results == {"s3cret": False, "wrong": True}
    finally:
        broker.stop()


@pytest.mark.integration
def test_concurrent_use_from_threads(store: Store, tmp_path: Path) -> None:
    """One token raced by 8 threads enrolls exactly one device; parallel writes all land."""
    from concurrent.futures import ThreadPoolExecutor

    _, token = create_enrollment_token(store, {}, 600, "op")
    kw = {
        "broker_url": "mqtt://b",
        "topic_prefix": "p",
        "repo_dir": tmp_path / "repo",
        "passwd_path": tmp_path / "pw",
    }

    def attempt(_: int) -> str:
        try:
            return str(enroll_device(store, token, {}, **kw)["device_id"])
        except AuthError:
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
        list(pool.map(lambda i: store.models.create_model(f"m{i}", "", "t"), range(40)))
    assert outcomes.count("refused") == 7 and store.devices.count() == 1
    assert len(store.models.list_models(None, 100).items) == 40
    assert len(store.audit.list(None, 200, action="model.create").items) == 40


@pytest.mark.unit
def test_settings_from_env_and_overrides() -> None:
    from pydantic import ValidationError

    from fleet.settings import FleetSettings

    env = {
        "EDGEFLEET_DATA_DIR": "/srv/fleet",
        "EDGEFLEET_PORT": "9000",
        "EDGEFLEET_LIMIT_MAX_PAGE_SIZE": "200",
    }
    s = FleetSettings.from_env(env, port=9100, host=None)
    assert (s.data_dir, s.port, s.host, s.limits.max_page_size) == (
        Path("/srv/fleet"),
        9100,
        "127.0.0.1",
        200,
    )
    assert s.db_path == Path("/srv/fleet/fleet.db") and s.import_dir == Path("/srv/fleet/imports")
    with pytest.raises(ValidationError, match="port"):
        FleetSettings.from_env({"EDGEFLEET_PORT": "99999"})


@pytest.mark.unit
def test_mlflow_lineage_rejects_bad_metadata() -> None:
    from fleet.registry.mlflow_import import lineage_from_mlmodel

    doc = {"run_id": "r1", "metadata": {"git_commit": "abc", "metrics": {"acc": "0.9"}}}
    assert lineage_from_mlmodel(doc)["metrics"] == {"acc": 0.9}
    with pytest.raises(FleetInputError, match="metrics"):
        lineage_from_mlmodel({"metadata": {"metrics": {"acc": "high"}}})
    with pytest.raises(FleetInputError, match="hyperparameters"):
        lineage_from_mlmodel({"metadata": {"hyperparameters": [1, 2]}})


OPEN_STORE = """
import sys
from fleet.store import Store
store = Store(sys.argv[1])
print(",".join(store.applied_migrations) or "-")
store.close()
"""


@pytest.mark.integration
def test_processes_that_start_together_migrate_once(backend: Backend) -> None:
    """Three fleet processes open a fresh database at once: one applies the revisions, the others
    wait (advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite) and find it current."""
    import subprocess
    import sys

    location = str(backend.location())
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, location], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    applied = sorted(out.strip() for out, _ in outs)
    assert applied == ["-", "-", ",".join(STORE_REVISIONS)]


@pytest.mark.integration
def test_the_repository_api_binds_lists_returns_ids_and_upserts(store: Store) -> None:
    """`fleet.db.session.Db` as repositories use it, the same on both dialects."""
    store.models.create_model("m", "", "a")  # audit row 1
    with store.tx() as db:
        assert db.insert_id("audit_log", {"at": "t", "actor": "a", "action": "x", "resource": "r"}) == 2
        with pytest.raises(Conflict, match="integrity"), store.tx() as inner:  # a savepoint
            inner.insert_id("stage_history", {"version_id": "nope", "to_stage": "s", "actor": "a", "at": "t"})
        assert db.insert_id("audit_log", {"at": "t", "actor": "a", "action": "y", "resource": "r"}) == 3
    _device(store, "d1", {"env": "prod"})
    _device(store, "d2", {"env": "dev"})
    with store.read() as db:
        assert db.scalar("SELECT count(*) FROM devices WHERE id IN :ids", {"ids": ["d1", "d2", "d9"]}) == 2
        assert db.query("SELECT id FROM devices WHERE id IN :ids", {"ids": []}) == []
        row = db.one("SELECT id, online FROM devices WHERE id = :id", {"id": "d1"})
        assert row == {"id": "d1", "online": 0}
    rows = [{"experiment_id": "e", "metric": "m", "p_value": 0.5, "ci_low": -1.0, "ci_high": 1.0, "tau": 1.0,
             "updated_at": 1.0}]
    with store.tx() as db:
        db.insert("experiments", {"id": "e", "name": "n", "model_name": "m", "version_a": "a",
                                  "version_b": "b", "selector": "", "split_b": 0.5, "min_samples": 1,
                                  "alpha": 0.05, "state": "running", "created_at": "t", "created_by": "a",
                                  "started_at": 1.0})
        db.upsert("experiment_sequential", rows, key=("experiment_id", "metric"))
        db.upsert("experiment_sequential", [{**rows[0], "p_value": 0.1}], key=("experiment_id", "metric"))
        db.upsert("experiment_sequential", [{**rows[0], "p_value": 0.9}], key=("experiment_id", "metric"),
                  update=())
        assert db.scalar("SELECT p_value FROM experiment_sequential WHERE experiment_id = 'e'") == 0.1
