"""Report keys at the fleet: registered at enrollment, registered/rotated by an operator (audited),
and counters that several ingest workers advance at most once each."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.settings import FleetSettings
from fleet.store import Store
from tests.support import postgres as pg
from tests.support.postgres import Backend
from tests.support.report_signing import DeviceKey


@dataclass
class Api:
    client: TestClient
    store: Store
    keys: dict[str, str]

    def h(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def token(self) -> str:
        res = self.client.post("/v1/enrollment-tokens", json={"labels": {}}, headers=self.h("operator"))
        assert res.status_code == 201, res.text
        return str(res.json()["token"])


@pytest.fixture
def api(tmp_path: Path, backend: Backend) -> Iterator[Api]:
    settings = FleetSettings(data_dir=tmp_path, database_url=backend.pg_url)
    store = Store(settings.database)
    keys = {role: create_api_key(store, role, role, "test")[1] for role in ("operator", "viewer")}
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield Api(client, store, keys)
    store.close()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.integration
def test_enrollment_registers_the_devices_public_report_key(api: Api) -> None:
    key = DeviceKey("later")
    res = api.client.post("/v1/enroll", json={"report_public_key": _b64(key.public)},
                          headers={"Authorization": f"Bearer {api.token()}"})
    assert res.status_code == 201, res.text
    device = res.json()["device_id"]
    assert api.store.report_keys.key_of(device) == key.public
    assert api.store.report_keys.last_counters(device) == {"reported": 0, "events": 0, "telemetry": 0,
                                                                "dataset": 0}


@pytest.mark.integration
@pytest.mark.parametrize("bad", ["not base64!", _b64(b"short"), _b64(b"\x00" * 31)])
def test_a_bad_report_key_is_refused_before_the_token_is_spent(api: Api, bad: str) -> None:
    token = api.token()
    auth = {"Authorization": f"Bearer {token}"}
    res = api.client.post("/v1/enroll", json={"report_public_key": bad}, headers=auth)
    assert res.status_code == 422 and "report_public_key" in res.text
    assert api.client.post("/v1/enroll", json={}, headers=auth).status_code == 201  # still unused


@pytest.mark.integration
def test_an_operator_registers_and_rotates_a_key_audited_with_counters_reset(api: Api) -> None:
    api.store.devices.create("old", {}, {}, "old", "$7$x", "test")
    first, second = DeviceKey("old"), DeviceKey("old")
    url = "/v1/devices/old/report-key"
    body = {"public_key": _b64(first.public)}
    assert api.client.put(url, json=body, headers=api.h("viewer")).status_code == 403
    assert api.client.put(url, json={"public_key": _b64(first.public)}).status_code == 401
    res = api.client.put(url, json={"public_key": _b64(first.public)}, headers=api.h("operator"))
    assert res.status_code == 200, res.text
    assert res.json()["counters"] == {"reported": 0, "events": 0, "telemetry": 0, "dataset": 0}
    assert api.store.report_keys.advance("old", "reported", 7) is None
    rotated = api.client.put(url, json={"public_key": _b64(second.public)}, headers=api.h("operator"))
    assert rotated.json()["counters"]["reported"] == 0  # the new key has signed nothing yet
    assert api.store.report_keys.key_of("old", fresh=True) == second.public
    audit = api.store.audit.list(None, 10, action="device.report_key").items
    assert [(a.before["report_public_key"], a.after["report_public_key"]) for a in reversed(audit)] == [
        (None, _b64(first.public)), (_b64(first.public), _b64(second.public))]
    missing = api.client.put("/v1/devices/nope/report-key", json={"public_key": _b64(first.public)},
                             headers=api.h("operator"))
    assert missing.status_code == 404
    bad = api.client.put(url, json={"public_key": _b64(b"x" * 33)}, headers=api.h("operator"))
    assert bad.status_code == 422


@pytest.mark.integration
def test_two_ingest_workers_accept_each_counter_once(backend: Backend) -> None:
    one, two = Store(backend.location()), Store(backend.location())
    try:
        one.devices.create("d", {}, {}, "d", "$7$x", "test")
        DeviceKey("d").register(one)
        wins: list[tuple[int, int]] = []
        lock = threading.Lock()

        def worker(store: Store, name: int) -> None:
            for counter in range(1, 41):  # both workers got a copy of every report
                if store.report_keys.advance("d", "events", counter) is None:
                    with lock:
                        wins.append((counter, name))

        threads = [threading.Thread(target=worker, args=(s, i)) for i, s in enumerate((one, two))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(c for c, _ in wins) == list(range(1, 41))  # each counter accepted exactly once
        assert two.report_keys.advance("d", "events", 40) == "duplicate"  # the last one again: refused
        assert two.report_keys.advance("d", "events", 7) == "replayed"
    finally:
        one.close()
        two.close()


@pytest.mark.integration
def test_counters_may_arrive_out_of_order_but_each_only_once_and_old_ones_fold_into_the_floor(
        backend: Backend) -> None:
    store = Store(backend.location())
    try:
        store.devices.create("d", {}, {}, "d", "$7$x", "test")
        DeviceKey("d").register(store)
        keys = store.report_keys
        # two workers of a shared subscription: 5 handled before 3
        assert keys.advance("d", "telemetry", 5) is None and keys.advance("d", "telemetry", 3) is None
        assert keys.advance("d", "telemetry", 3) == "replayed"
        assert keys.advance("d", "telemetry", 5) == "duplicate"
        assert keys.advance("d", "reported", 3) is None  # kinds are apart
        assert keys.advance("d", "dataset", 7) is None  # dataset chunks too (store_0012's floor)
        expected = {"reported": 3, "events": 0, "telemetry": 5, "dataset": 7}
        assert keys.last_counters("d") == expected
        assert keys.prune(cutoff=time.time() + 1) == 4  # everything claimed so far is "old" now
        assert keys.last_counters("d") == expected  # now the floors
        assert keys.advance("d", "telemetry", 4) == "replayed"  # never seen, but below the floor
        assert keys.advance("d", "dataset", 6) == "replayed"
        assert keys.advance("d", "telemetry", 6) is None
    finally:
        store.close()


@pytest.mark.integration
@pytest.mark.postgres
def test_a_claim_survives_the_server_dropping_the_claims_pooled_connection(postgres_db: str) -> None:
    """PostgreSQL claims run on an autocommit pool without pre-ping: a connection the server
    closed is retried once on a fresh one, and the claims still commit without a WAL flush."""
    schema = pg.create_schema(postgres_db)
    store = Store(pg.url(postgres_db, schema))
    try:
        store.devices.create("d", {}, {}, "d", "$7$x", "test")
        DeviceKey("d").register(store)
        assert store.report_keys.advance("d", "telemetry", 1) is None
        with psycopg.connect(pg.ADMIN_DSN.replace("dbname=postgres", f"dbname={postgres_db}"),
                             autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert store.report_keys.advance("d", "telemetry", 2) is None
        assert store.report_keys.advance("d", "telemetry", 2) == "duplicate"
        assert store.report_keys.advance("d", "telemetry", 1) == "replayed"
        with store.report_keys._autocommit_engine().connect() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
        assert store.report_keys.last_counters("d")["telemetry"] == 2
    finally:
        store.close()
        pg.drop_schema(postgres_db, schema)
