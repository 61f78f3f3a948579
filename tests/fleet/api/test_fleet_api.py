"""The admin API through FastAPI's TestClient (in-process ASGI) and a real uvicorn process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.settings import FleetSettings, Limits
from fleet.store import Store
from tests.support.broker import free_port
from tests.support.datasets import seed_dataset
from tests.support.fakes import DIGEST, FakeClock
from tests.support.postgres import Backend

MUTATING = {"post", "put", "patch", "delete"}
PUBLIC = {"/health", "/docs", "/openapi.json"}
NEEDS_QUERY = {"/v1/drift/compare", "/v1/telemetry/performance"}  # required query: 422 without them


@dataclass
class Api:
    client: TestClient
    store: Store
    clock: FakeClock
    settings: FleetSettings
    keys: dict[str, str]

    def h(self, role: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}", **extra}

    def enroll(self, labels: dict[str, str]) -> dict[str, Any]:
        tok = self.client.post("/v1/enrollment-tokens", json={"labels": labels}, headers=self.h("operator"))
        assert tok.status_code == 201, tok.text
        res = self.client.post(
            "/v1/enroll",
            json={"agent_version": "0.1.0", "runtimes": ["onnx"]},
            headers={"Authorization": f"Bearer {tok.json()['token']}"},
        )
        assert res.status_code == 201, res.text
        return dict(res.json())


@pytest.fixture
def api(tmp_path: Path, backend: Backend) -> Iterator[Api]:
    """The API over a store on each backend (SQLite in tmp_path, then PostgreSQL)."""
    clock = FakeClock()
    settings = FleetSettings(data_dir=tmp_path, limits=Limits(max_page_size=20, default_page_size=5),
                             database_url=backend.pg_url)
    store = Store(settings.database, clock=clock)
    keys = {role: create_api_key(store, role, role, "test")[1] for role in ("admin", "operator", "viewer")}
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield Api(client, store, clock, settings, keys)
    store.close()


def _seed(api: Api) -> dict[str, str]:
    """One of each resource, so every path parameter can name something that exists."""
    h = api.h("operator")
    assert api.client.post("/v1/models", json={"name": "m"}, headers=h).status_code == 201
    v = api.client.post(
        "/v1/models/m/versions",
        headers=h,
        json={"version": "1.0.0", "artifact_digest": DIGEST, "runtime": "onnx"},
    )
    assert v.status_code == 201, v.text
    dev = api.enroll({"env": "prod"})
    ro = api.client.post(
        "/v1/rollouts", json={"model_version_id": "m:1.0.0", "selector": "env=prod"}, headers=h
    )
    tok = api.client.post("/v1/enrollment-tokens", json={}, headers=h).json()
    key = api.client.post("/v1/api-keys", json={"name": "k", "role": "viewer"}, headers=api.h("admin")).json()
    for v in ("1.1.0", "1.2.0"):  # two versions with bundles for an A/B experiment
        api.client.post("/v1/models/m/versions", headers=h, json={
            "version": v, "artifact_digest": DIGEST, "runtime": "onnx",
            "bundle_target": f"models/m/m-{v}.efb"})
    ex = api.client.post("/v1/experiments", headers=h,
                         json={"name": "ab", "version_a": "m:1.1.0", "version_b": "m:1.2.0"})
    assert ex.status_code == 201, ex.text
    col = api.client.post("/v1/collections", headers=h, json={"model": "m", "version": "1.0.0"})
    assert col.status_code == 201, col.text
    return {
        "collection_id": col.json()["collection_id"],
        "dataset_id": seed_dataset(api.settings.telemetry_database, col.json()["collection_id"]),
        "experiment_id": ex.json()["id"],
        "name": "m",
        "version": "1.0.0",
        "device_id": dev["device_id"],
        "rollout_id": ro.json()["id"],
        "token_id": tok["id"],
        "key_id": key["id"],
        "alert_id": "1",  # no such alert: operators get 404, viewers 403
        "job_id": api.store.training.create("m", "1.0.0", "test").id,  # training jobs (fleet/training)
    }


def _operations(api: Api) -> list[tuple[str, str]]:
    doc = api.client.get("/openapi.json").json()
    return [(path, method) for path, ops in doc["paths"].items() for method in ops]


@pytest.mark.integration
def test_every_route_needs_credentials_and_respects_roles(api: Api) -> None:
    ids = _seed(api)
    ops = _operations(api)
    assert len(ops) >= 25
    for path, method in ops:
        url = path.format(**ids)
        anon = api.client.request(method, url, json={})
        if path in PUBLIC:
            assert anon.status_code == 200, (method, path)
        else:
            assert anon.status_code == 401, (method, path, anon.status_code)
            assert anon.headers["www-authenticate"] == "Bearer"
        bad = api.client.request(method, url, json={}, headers={"Authorization": "Bearer efk_wrong"})
        assert bad.status_code in (401, 200 if path in PUBLIC else 401), (method, path)
    for role in ("viewer", "operator", "admin"):
        for path, method in ops:
            res = api.client.request(method, path.format(**ids), json={}, headers=api.h(role))
            assert res.status_code < 500, (role, method, path, res.text)
            if role == "viewer" and method in MUTATING:
                assert not 200 <= res.status_code < 300, (method, path)
                assert res.status_code in (401, 403), (method, path, res.status_code)
            if method == "get" and path not in PUBLIC:
                admin_only = path.startswith("/v1/api-keys")
                operator_only = path.startswith("/v1/enrollment-tokens")
                allowed = (
                    role == "admin"
                    or (role == "operator" and not admin_only)
                    or not (admin_only or operator_only)
                )
                expected = 422 if path in NEEDS_QUERY else (200 if allowed else 403)
                assert res.status_code == expected, (role, path, res.text)
    for path in PUBLIC:
        assert api.client.get(path).status_code == 200


@pytest.mark.integration
def test_idempotent_creates(api: Api) -> None:
    h = api.h("operator", **{"Idempotency-Key": "abc-1"})
    first = api.client.post("/v1/models", json={"name": "m1", "description": "x"}, headers=h)
    again = api.client.post("/v1/models", json={"name": "m1", "description": "x"}, headers=h)
    assert (first.status_code, again.status_code) == (201, 201)
    assert first.json() == again.json() and again.headers["idempotent-replayed"] == "true"
    other = api.client.post("/v1/models", json={"name": "m2"}, headers=h)
    assert other.status_code == 409 and "different request" in other.json()["detail"][0]["msg"]
    # Same key, another actor: an independent request (and the model exists: 409 from the registry).
    admin = api.client.post(
        "/v1/models",
        json={"name": "m1", "description": "x"},
        headers=api.h("admin", **{"Idempotency-Key": "abc-1"}),
    )
    assert admin.status_code == 409 and "already exists" in admin.json()["detail"][0]["msg"]
    # A replayed token create returns the same record (its one-time token is not stored, so not
    # repeated: tests/fleet/api/test_api_secrets.py) and does not mint a second.
    th = api.h("operator", **{"Idempotency-Key": "tok-1"})
    t1 = api.client.post("/v1/enrollment-tokens", json={"labels": {"a": "b"}}, headers=th).json()
    t2 = api.client.post("/v1/enrollment-tokens", json={"labels": {"a": "b"}}, headers=th).json()
    assert t2["id"] == t1["id"] and t2["token"] is None
    assert len(api.client.get("/v1/enrollment-tokens", headers=api.h("operator")).json()["items"]) == 1
    assert len(api.store.audit.list(None, 100, action="model.create").items) == 1
    long_key = api.client.post(
        "/v1/models", json={"name": "m3"}, headers=api.h("operator", **{"Idempotency-Key": "k" * 201})
    )
    assert long_key.status_code == 422 and long_key.json()["detail"][0]["loc"] == [
        "header",
        "Idempotency-Key",
    ]


@pytest.mark.integration
def test_concurrent_duplicates_create_once(api: Api) -> None:
    from concurrent.futures import ThreadPoolExecutor

    h = api.h("operator", **{"Idempotency-Key": "race"})

    def post(_: int) -> tuple[int, str]:
        res = api.client.post(
            "/v1/rollouts", json={"model_version_id": "m:1.0.0", "selector": "env=prod"}, headers=h
        )
        return res.status_code, res.json()["id"]

    _seed(api)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(post, range(12)))
    assert {code for code, _ in results} == {201} and len({rid for _, rid in results}) == 1
    assert len(api.store.rollouts.list(None, 100).items) == 2  # the seeded one and this one


@pytest.mark.integration
def test_pagination(api: Api) -> None:
    for i in range(12):
        assert (
            api.client.post("/v1/models", json={"name": f"m{i:02d}"}, headers=api.h("operator")).status_code
            == 201
        )
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        body = api.client.get("/v1/models", params=params, headers=api.h("viewer")).json()
        seen += [m["name"] for m in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"m{i:02d}" for i in range(12)] and pages == 3
    default = api.client.get("/v1/models", headers=api.h("viewer")).json()
    assert len(default["items"]) == 5
    too_big = api.client.get("/v1/models", params={"limit": 21}, headers=api.h("viewer"))
    assert too_big.status_code == 422 and too_big.json()["detail"][0]["loc"] == ["query", "limit"]
    zero = api.client.get("/v1/models", params={"limit": 0}, headers=api.h("viewer"))
    assert zero.status_code == 422 and zero.json()["detail"][0]["loc"] == ["query", "limit"]
    bad = api.client.get("/v1/models", params={"cursor": "!!!"}, headers=api.h("viewer"))
    assert bad.status_code == 422 and "cursor" in bad.json()["detail"][0]["msg"]


@pytest.mark.integration
def test_label_selector_filtering(api: Api) -> None:
    devs = {
        "a": api.enroll({"env": "prod", "region": "eu"})["device_id"],
        "b": api.enroll({"env": "prod", "region": "us", "gpu": "true"})["device_id"],
        "c": api.enroll({"env": "dev", "region": "eu"})["device_id"],
    }

    def ids(selector: str) -> set[str]:
        res = api.client.get(
            "/v1/devices", params={"selector": selector, "limit": 20}, headers=api.h("viewer")
        )
        assert res.status_code == 200, res.text
        return {d["id"] for d in res.json()["items"]}

    assert ids("env=prod") == {devs["a"], devs["b"]}
    assert ids("env=prod,region in (eu,ap)") == {devs["a"]}
    assert ids("region notin (us),env!=prod") == {devs["c"]}
    assert ids("gpu") == {devs["b"]} and ids("!gpu") == {devs["a"], devs["c"]}
    assert ids("") == set(devs.values())
    bad = api.client.get("/v1/devices", params={"selector": "region in (eu"}, headers=api.h("viewer"))
    assert bad.status_code == 422 and "unbalanced" in bad.json()["detail"][0]["msg"]
    relabel = api.client.put(
        f"/v1/devices/{devs['c']}/labels", json={"labels": {"env": "prod"}}, headers=api.h("operator")
    )
    assert relabel.status_code == 200
    assert ids("env=prod") == set(devs.values())
    badlabel = api.client.put(
        f"/v1/devices/{devs['c']}/labels", json={"labels": {"bad key": "x"}}, headers=api.h("operator")
    )
    assert badlabel.status_code == 422 and "bad key" in badlabel.json()["detail"][0]["msg"]


@pytest.mark.integration
def test_enrollment_single_use_expiry_and_root(api: Api) -> None:
    root = {"signed": {"_type": "root", "version": 2}, "signatures": []}
    (api.settings.repo_dir / "metadata").mkdir(parents=True)
    (api.settings.repo_dir / "metadata" / "1.root.json").write_text(json.dumps({"signed": {"version": 1}}))
    (api.settings.repo_dir / "metadata" / "2.root.json").write_text(json.dumps(root))
    tok = api.client.post(
        "/v1/enrollment-tokens",
        json={"labels": {"site": "lab"}, "ttl_seconds": 300},
        headers=api.h("operator"),
    ).json()
    assert tok["token"].startswith("eft_") and tok["labels"] == {"site": "lab"}
    auth = {"Authorization": f"Bearer {tok['token']}"}
    res = api.client.post("/v1/enroll", json={"architecture": "aarch64"}, headers=auth)
    assert res.status_code == 201, res.text
    body = res.json()
    assert body["tuf_root"] == root and body["labels"] == {"site": "lab"}
    assert body["broker"]["username"] == body["device_id"] and len(body["broker"]["password"]) >= 24
    assert body["broker"]["topic_prefix"] == api.settings.topic_prefix  # the root, as in the agent config
    passwd = api.settings.broker_passwd_path.read_text()
    assert passwd.startswith(f"{body['device_id']}:$7$101$") and body["broker"]["password"] not in passwd
    again = api.client.post("/v1/enroll", json={}, headers=auth)
    assert again.status_code == 401
    assert again.json()["detail"][0]["msg"] == "invalid, used or expired enrollment token"
    late = api.client.post(
        "/v1/enrollment-tokens", json={"ttl_seconds": 60}, headers=api.h("operator")
    ).json()
    api.clock.advance(61)
    expired = api.client.post("/v1/enroll", json={}, headers={"Authorization": f"Bearer {late['token']}"})
    assert expired.status_code == 401
    # An API key is not an enrollment token.
    assert api.client.post("/v1/enroll", json={}, headers=api.h("admin")).status_code == 401
    listed = api.client.get("/v1/enrollment-tokens", headers=api.h("operator")).json()["items"]
    assert all("token" not in t and "token_hash" not in t for t in listed)
    used = next(t for t in listed if t["id"] == tok["id"])
    assert used["device_id"] == body["device_id"] and used["used_at"] is not None
    assert (
        api.client.delete(f"/v1/enrollment-tokens/{tok['id']}", headers=api.h("operator")).status_code == 409
    )
    assert (
        api.client.delete(f"/v1/enrollment-tokens/{late['id']}", headers=api.h("operator")).status_code == 204
    )


@pytest.mark.integration
def test_revocation_removes_broker_credentials(api: Api) -> None:
    keep = api.enroll({})["device_id"]
    gone = api.enroll({})["device_id"]
    res = api.client.post(f"/v1/devices/{gone}/revoke", json={"reason": "stolen"}, headers=api.h("operator"))
    assert res.status_code == 200 and res.json()["revoked"] is True
    users = [line.split(":")[0] for line in api.settings.broker_passwd_path.read_text().splitlines()]
    assert users == [keep]
    assert (
        api.client.post(f"/v1/devices/{gone}/revoke", json={}, headers=api.h("operator")).status_code == 409
    )
    assert (
        api.client.post("/v1/devices/dev-nope/revoke", json={}, headers=api.h("operator")).status_code == 404
    )
    revoked = api.client.get("/v1/devices", params={"revoked": True}, headers=api.h("viewer")).json()["items"]
    assert [d["id"] for d in revoked] == [gone]


@pytest.mark.integration
def test_audit_records_before_and_after(api: Api) -> None:
    _seed(api)
    res = api.client.post(
        "/v1/models/m/versions/1.0.0/stage", json={"stage": "canary", "note": "go"}, headers=api.h("operator")
    )
    assert res.status_code == 200 and res.json()["stage"] == "canary"
    entries = api.client.get(
        "/v1/audit", params={"resource": "models/m/versions/1.0.0"}, headers=api.h("viewer")
    ).json()["items"]
    assert [e["action"] for e in entries] == ["model_version.stage", "model_version.create"]
    stage = entries[0]
    assert stage["before"] == {"stage": "registered"} and stage["after"] == {"stage": "canary", "note": "go"}
    assert stage["actor"].startswith("key:") and stage["actor"].endswith(":operator")
    assert entries[1]["before"] is None and entries[1]["after"]["artifact_digest"] == DIGEST
    actions = {e.action for e in api.store.audit.list(None, 100).items}
    assert {
        "model.create",
        "device.enroll",
        "rollout.create",
        "enrollment_token.create",
        "api_key.create",
    } <= actions
    hist = api.client.get("/v1/models/m/versions/1.0.0/history", headers=api.h("viewer")).json()
    assert [h["to_stage"] for h in hist] == ["registered", "canary"]


@pytest.mark.integration
def test_validation_errors_name_the_field(api: Api) -> None:
    api.client.post("/v1/models", json={"name": "m"}, headers=api.h("operator"))
    res = api.client.post(
        "/v1/models/m/versions",
        headers=api.h("operator"),
        json={"version": "1", "artifact_digest": "md5:x", "runtime": "onnx", "extra": 1},
    )
    assert res.status_code == 422
    locs = {tuple(e["loc"]) for e in res.json()["detail"]}
    assert {("body", "version"), ("body", "artifact_digest"), ("body", "extra")} <= locs
    big = api.client.post(
        "/v1/models",
        content=b"x" * (api.settings.limits.max_body_bytes + 1),
        headers=api.h("operator", **{"Content-Type": "application/json"}),
    )
    assert big.status_code == 413


@pytest.mark.integration
def test_api_keys_and_roles(api: Api) -> None:
    for role in ("viewer", "operator"):
        assert api.client.get("/v1/api-keys", headers=api.h(role)).status_code == 403
    created = api.client.post("/v1/api-keys", json={"name": "ci", "role": "operator"}, headers=api.h("admin"))
    assert created.status_code == 201
    key = created.json()["key"]
    who = api.client.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"}).json()
    assert who == {"key_id": created.json()["id"], "name": "ci", "role": "operator"}
    listed = api.client.get("/v1/api-keys", headers=api.h("admin")).json()["items"]
    assert all("key" not in k and "key_hash" not in k for k in listed)
    rev = api.client.post(f"/v1/api-keys/{created.json()['id']}/revoke", headers=api.h("admin"))
    assert rev.status_code == 200
    assert api.client.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    admin_id = api.client.get("/v1/whoami", headers=api.h("admin")).json()["key_id"]
    last = api.client.post(f"/v1/api-keys/{admin_id}/revoke", headers=api.h("admin"))
    assert last.status_code == 409 and "last active admin" in last.json()["detail"][0]["msg"]


@pytest.mark.integration
def test_rollout_routes_store_intent_only(api: Api) -> None:
    ids = _seed(api)
    rid, h = ids["rollout_id"], api.h("operator")
    ro = api.client.get(f"/v1/rollouts/{rid}", headers=api.h("viewer")).json()
    assert (ro["state"], ro["desired"], ro["selector"]) == ("pending", "run", "env=prod")
    paused = api.client.post(f"/v1/rollouts/{rid}/pause", json={"note": "wait"}, headers=h).json()
    assert (paused["state"], paused["desired"]) == ("pending", "pause")
    assert api.client.post(f"/v1/rollouts/{rid}/pause", json={}, headers=h).status_code == 409
    assert api.client.post(f"/v1/rollouts/{rid}/abort", json={}, headers=h).json()["desired"] == "abort"
    assert api.client.post(f"/v1/rollouts/{rid}/resume", json={}, headers=h).status_code == 409
    status = api.client.get(f"/v1/rollouts/{rid}/status", headers=api.h("viewer")).json()
    assert status == {
        "id": rid,
        "state": "pending",
        "desired": "abort",
        "stage": 0,
        "updated_at": status["updated_at"],
        "baking_until": None,
        "approval_due": None,
        "devices_total": 0,
        "devices_by_status": {},
        "warnings": [],  # not started, but its selector matches the enrolled device
    }
    bad = api.client.post("/v1/rollouts", json={"model_version_id": "m:9.9.9", "selector": ""}, headers=h)
    assert bad.status_code == 404
    bad_sel = api.client.post(
        "/v1/rollouts", json={"model_version_id": "m:1.0.0", "selector": "a in ("}, headers=h
    )
    assert bad_sel.status_code == 422


@pytest.mark.integration
def test_mlflow_import(api: Api) -> None:
    from simulators.models import make_mlp_onnx

    model_dir = api.settings.import_dir / "run1" / "model"
    model_dir.mkdir(parents=True)
    onnx_bytes = make_mlp_onnx(seed=1)
    (model_dir / "model.onnx").write_bytes(onnx_bytes)
    (model_dir / "MLmodel").write_text(
        "artifact_path: model\nflavors:\n  onnx:\n    data: model.onnx\n    onnx_version: 1.16.0\n"
        "  python_function:\n    data: model.onnx\n    loader_module: mlflow.onnx\n"
        "mlflow_version: 2.14.1\nrun_id: 0123abcd\nmodel_uuid: u-1\n"
        "metadata:\n  git_commit: deadbeef\n  dataset_ref: s3://bucket/train.parquet\n"
        f"  dataset_digest: {DIGEST}\n  hyperparameters: {{lr: 0.01, epochs: 5}}\n  metrics: {{acc: 0.93}}\n"
    )
    res = api.client.post(
        "/v1/models/import-mlflow",
        json={"path": "run1/model", "model": "mlp", "version": "1.0.0"},
        headers=api.h("operator"),
    )
    assert res.status_code == 201, res.text
    v = res.json()
    import hashlib

    assert v["artifact_digest"] == "sha256:" + hashlib.sha256(onnx_bytes).hexdigest()
    assert v["lineage"]["training_code_ref"] == "deadbeef" and v["lineage"]["metrics"] == {"acc": 0.93}
    assert v["lineage"]["hyperparameters"] == {"lr": 0.01, "epochs": 5}
    assert v["lineage"]["source"]["run_id"] == "0123abcd"
    escape = api.client.post(
        "/v1/models/import-mlflow",
        json={"path": "../../etc", "model": "x", "version": "1.0.0"},
        headers=api.h("operator"),
    )
    assert escape.status_code == 422 and "outside" in escape.json()["detail"][0]["msg"]
    (model_dir / "MLmodel").write_text("flavors:\n  sklearn: {}\n")
    no_onnx = api.client.post(
        "/v1/models/import-mlflow",
        json={"path": "run1/model", "model": "mlp", "version": "1.0.1"},
        headers=api.h("operator"),
    )
    assert no_onnx.status_code == 422 and "onnx flavor" in no_onnx.json()["detail"][0]["msg"]


@pytest.mark.integration
def test_real_uvicorn_process_serves_and_persists(tmp_path: Path) -> None:
    env = {**os.environ, "EDGEFLEET_DATA_DIR": str(tmp_path)}
    cli = [sys.executable, "-m", "agent.cli", "fleet"]
    out = subprocess.run([*cli, "create-admin-key"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("efk_") and key not in (tmp_path / "fleet.db").read_bytes().decode("latin-1")
    port = free_port()

    def serve() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*cli, "serve", "--port", str(port)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.TransportError:
                time.sleep(0.05)
        proc.kill()
        raise AssertionError(f"server did not start: {proc.communicate()[0]}")

    proc = serve()
    try:
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.post(f"{base}/v1/models", json={"name": "persist"}, headers=auth).status_code == 201
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    proc = serve()
    try:
        names = [m["name"] for m in httpx.get(f"{base}/v1/models", headers=auth).json()["items"]]
        assert names == ["persist"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@dataclass
class _Recorder:
    """A component that records its lifecycle into a shared list."""

    name: str
    log: list[str]
    fail_stop: bool = False

    def start(self) -> None:
        self.log.append(f"start:{self.name}")

    def stop(self) -> None:
        self.log.append(f"stop:{self.name}")
        if self.fail_stop:
            raise RuntimeError("boom")


@pytest.mark.integration
def test_fleet_service_starts_and_stops_components_in_order(tmp_path: Path) -> None:
    from fleet.service import FleetService

    log: list[str] = []
    settings = FleetSettings(data_dir=tmp_path, port=free_port())
    comps = [_Recorder("publisher", log, fail_stop=True), _Recorder("controller", log)]
    service = FleetService(settings, components=comps)
    service.start_background()
    try:
        assert httpx.get(f"http://127.0.0.1:{settings.port}/health").status_code == 200
        assert settings.broker_passwd_path.read_text() == ""  # synced from the (empty) store at start
    finally:
        service.stop()
    assert log == ["start:publisher", "start:controller", "stop:controller", "stop:publisher"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{settings.port}/health", timeout=1)


@pytest.mark.integration
def test_cli_create_token_validates_labels(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fleet.cli.fleet import group

    runner = CliRunner()
    ok = runner.invoke(group, ["create-token", "--data-dir", str(tmp_path), "--labels", "env=prod,region=eu"])
    assert ok.exit_code == 0, ok.output
    token = ok.stdout.strip().splitlines()[-1]
    assert token.startswith("eft_")
    bad = runner.invoke(group, ["create-token", "--data-dir", str(tmp_path), "--labels", "env"])
    assert bad.exit_code == 2 and "not key=value" in bad.output
    store = Store(tmp_path / "fleet.db")
    try:
        tokens = store.access.list_tokens(None, 10).items
        assert [t.labels for t in tokens] == [{"env": "prod", "region": "eu"}]
        assert store.audit.list(None, 10).items[0].actor == "cli:create-token"
    finally:
        store.close()
