"""`edgefleet fleet serve --database postgresql://...` end to end: a real process over PostgreSQL.

The CLI makes the admin key in PostgreSQL, the service serves the API from it (models,
versions, enrollment, devices, rollouts, audit, alerts), nothing of the store is written to
SQLite files in the data directory, a second process sees the same state, and a password in the
URL never reaches the logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from fleet.db import migrate
from tests.support import postgres as pg
from tests.support.broker import free_port
from tests.support.fakes import DIGEST

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
def pg_url(postgres_db: str) -> Iterator[str]:
    schema = pg.create_schema(postgres_db)
    try:
        yield pg.url(postgres_db, schema)
    finally:
        pg.drop_schema(postgres_db, schema)


def _cli(data_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "fleet", *args, "--data-dir", str(data_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def _serve(data_dir: Path, env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "fleet", "serve", "--data-dir",
                                 str(data_dir), "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"fleet serve did not answer: {log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_fleet_serve_on_postgres_end_to_end(tmp_path: Path, pg_url: str, postgres_db: str) -> None:
    data = tmp_path / "data"
    # the URL with a password (PostgreSQL trusts 127.0.0.1, so any password works): never logged
    url = pg_url.replace("postgres@", "postgres:pw-n0t-in-logs@", 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEFLEET_DATABASE_URL": url}
    made = _cli(data, env, "create-admin-key")
    assert made.returncode == 0, made.stderr
    admin = made.stdout.strip().splitlines()[-1]
    port = free_port()
    proc = _serve(data, env, port, tmp_path / "serve.log")
    base, h = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {admin}"}
    try:
        assert httpx.post(f"{base}/v1/models", json={"name": "m"}, headers=h).status_code == 201
        v = httpx.post(f"{base}/v1/models/m/versions", headers=h,
                       json={"version": "1.0.0", "artifact_digest": DIGEST, "runtime": "onnx"})
        assert v.status_code == 201, v.text
        dup = httpx.post(f"{base}/v1/models/m/versions", headers=h,
                         json={"version": "1.0.0", "artifact_digest": DIGEST, "runtime": "onnx"})
        assert dup.status_code == 409, dup.text  # the unique key's violation, through the seam
        tok = httpx.post(f"{base}/v1/enrollment-tokens", json={"labels": {"env": "prod"}}, headers=h).json()
        dev = httpx.post(f"{base}/v1/enroll", json={"agent_version": "0.1.0", "runtimes": ["onnx"]},
                         headers={"Authorization": f"Bearer {tok['token']}"})
        assert dev.status_code == 201, dev.text
        again = httpx.post(f"{base}/v1/enroll", json={"agent_version": "0.1.0"},
                           headers={"Authorization": f"Bearer {tok['token']}"})
        assert again.status_code == 401  # single use, on PostgreSQL too
        devices = httpx.get(f"{base}/v1/devices", params={"selector": "env=prod"}, headers=h).json()
        assert [d["id"] for d in devices["items"]] == [dev.json()["device_id"]]
        ro = httpx.post(f"{base}/v1/rollouts", json={"model_version_id": "m:1.0.0", "selector": "env=prod"},
                        headers=h)
        assert ro.status_code == 201, ro.text
        assert httpx.get(f"{base}/v1/alerts", headers=h).status_code == 200
        audit = httpx.get(f"{base}/v1/audit", headers=h).json()["items"]
        assert {"model.create", "model_version.create", "device.enroll", "rollout.create"} <= {
            e["action"] for e in audit}
        assert httpx.get(f"{base}/metrics", headers=h).status_code == 200
    finally:
        _stop(proc)
    log = (tmp_path / "serve.log").read_text()
    assert "pw-n0t-in-logs" not in log + made.stderr and "postgres:***@" in log
    assert not any((data / name).exists() for name in ("fleet.db", "telemetry.db", "alerts.db"))
    # the state is in PostgreSQL: a second process (the CLI) sees it, and so does psql
    schema = pg_url.rsplit("%3D", 1)[1]
    with psycopg.connect(f"host={pg.HOST} user={pg.USER} dbname={postgres_db}") as conn:
        rows = conn.execute(f'SELECT id FROM "{schema}".model_versions').fetchall()
        heads = conn.execute(f'SELECT version_num FROM "{schema}".alembic_version ORDER BY 1').fetchall()
    assert rows == [("m:1.0.0",)]
    groups = ("alerts", "director", "store", "telemetry")
    assert [h[0] for h in heads] == sorted(migrate.head(g) for g in groups)
    migrated = _cli(data, env, "migrate")
    store_head = migrate.head("store")
    assert migrated.returncode == 0 and f"{store_head}; applied now: none" in migrated.stdout, migrated.stderr


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "serve",
                          "--data-dir", str(tmp_path / "d"), "--port", str(free_port()), "--database",
                          "postgresql://fleet:secret-pw@127.0.0.1:1/fleet?connect_timeout=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1
    assert "Error: cannot open fleet database postgresql://fleet:***@127.0.0.1:1/fleet" in out.stderr
    assert "secret-pw" not in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout
