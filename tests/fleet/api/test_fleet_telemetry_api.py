"""Telemetry, drift and alert routes over real bundles, real encoded reports and real SQLite."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.settings import FleetSettings, Limits
from fleet.store import Store
from fleet.telemetry.alerts import AlertManager, Observation
from fleet.telemetry.ingest import TelemetryStore
from fleet.telemetry.monitor import BundleProfiles, build_drift_monitor
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from tests.support.fakes import FakeClock
from tests.support.telemetry import (
    MLP_FEATURES,
    MLP_REFERENCE,
    T0,
    column_shift,
    encoded_reports,
    mlp_outputs,
    publish_mlp,
)

DRIFTED = ["feat3", "feat17"]
WINDOWS = 3  # per (version, cohort), starting at T0 + 60, + 120, + 180


@dataclass
class World:
    client: TestClient
    store: Store
    keys: dict[str, str]

    def h(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def get(self, url: str, role: str = "viewer", **params: Any) -> Any:
        res = self.client.get(url, params=params, headers=self.h(role))
        assert res.status_code == 200, res.text
        return res.json()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """mlp 1.0.0 and 1.1.0 published; 1.0.0 reports from cohorts a (no drift), b (feat3 and
    feat17 shifted by 1.5 sd) and c (every feature shifted); 1.1.0 from cohort a. The drift
    monitor has evaluated every window once, so alerts and a retraining trigger exist."""
    tmp = tmp_path_factory.mktemp("telemetry-api")
    settings = FleetSettings(data_dir=tmp / "fleet", limits=Limits(max_page_size=20, default_page_size=5))
    store = Store(settings.db_path, clock=FakeClock())
    keys = {role: create_api_key(store, role, role, "test")[1] for role in ("admin", "operator", "viewer")}
    profile = publish_mlp(settings, store, "1.0.0", tmp)
    assert publish_mlp(settings, store, "1.1.0", tmp) == profile
    publish_mlp(settings, store, "2.0.0", tmp, reference=MLP_REFERENCE * 2.0)  # other edges, no telemetry
    telemetry = TelemetryStore(settings.telemetry_db_path, profiles=BundleProfiles(
        store, Repository(settings.repo_dir, KeyStore(settings.keys_dir))), clock=lambda: T0 + 100_000)
    plan = [("1.0.0", "a", 0.0), ("1.0.0", "b", column_shift(32, [3, 17], 1.5)),
            ("1.0.0", "c", column_shift(32, range(32), 1.5)), ("1.1.0", "a", 0.0)]
    for seed, (version, cohort, shift) in enumerate(plan):
        for payload in encoded_reports(profile, "mlp", version, cohort, 2, [shift] * WINDOWS, mlp_outputs,
                                       seed=seed):
            assert telemetry.ingest(payload) == "accepted"
    monitor = build_drift_monitor(settings, store, telemetry, clock=FakeClock(T0 + 60 * (WINDOWS + 2) + 30))
    assert monitor.run_once()
    monitor.stop()
    telemetry.close()
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield World(client, store, keys)
    store.close()


def _walk(w: World, url: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        page = w.get(url, **params, **({"cursor": cursor} if cursor else {}))
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


@pytest.mark.integration
def test_drift_names_exactly_the_drifted_features(world: World) -> None:
    (b,) = world.get("/v1/drift", model="mlp", version="1.0.0", cohort="b")["items"]
    assert b["drifted_features"] == DRIFTED
    assert b["drifted_share"] == pytest.approx(2 / 32) and not b["dataset_drift"]
    assert (b["cohort"], b["windows"], b["reports"]) == ("b", WINDOWS, 2 * WINDOWS)
    assert [f["name"] for f in b["features"]] == MLP_FEATURES
    for f in b["features"]:
        assert f["method"] == "ks_budget" and f["n_current"] == 2 * WINDOWS * 700
        assert f["drifted"] == (f["statistic"] > f["threshold"]) == (f["name"] in DRIFTED)
    assert b["thresholds"]["dataset_drift_share"] == 0.5

    by_cohort = world.get("/v1/drift", model="mlp", version="1.0.0", by_cohort="true", limit=20)
    drifted = {i["cohort"]: i["drifted_features"] for i in by_cohort["items"]}
    assert drifted == {"a": [], "b": DRIFTED, "c": MLP_FEATURES}
    c = next(i for i in by_cohort["items"] if i["cohort"] == "c")
    assert c["dataset_drift"] and c["drifted_share"] == 1.0

    psi = world.get("/v1/drift", model="mlp", version="1.0.0", cohort="b", statistic="psi")["items"][0]
    assert {f["method"] for f in psi["features"]} == {"psi"}
    assert {f["name"] for f in psi["features"] if f["drifted"]} >= set(DRIFTED)

    merged = world.get("/v1/drift", model="mlp")["items"]  # every cohort merged per version
    assert [(i["version"], i["cohort"], i["windows"]) for i in merged] == [("1.0.0", None, 9),
                                                                          ("1.1.0", None, 3)]
    assert world.get("/v1/drift", model="mlp", version="1.1.0")["items"][0]["drifted_features"] == []
    assert world.get("/v1/drift", model="other")["items"] == []
    early = world.get("/v1/drift", model="mlp", version="1.0.0", until=T0 + 60)
    assert early["items"] == []


@pytest.mark.integration
def test_drift_pages_and_refuses_bad_queries(world: World) -> None:
    items = _walk(world, "/v1/drift", by_cohort="true", limit=1)
    assert [(i["version"], i["cohort"]) for i in items] == [("1.0.0", "a"), ("1.0.0", "b"), ("1.0.0", "c"),
                                                           ("1.1.0", "a")]
    h = world.h("viewer")
    for params in ({"statistic": "median"}, {"since": "nan"}, {"since": T0 + 100, "until": T0},
                   {"cursor": "garbage"}, {"limit": 21}):
        res = world.client.get("/v1/drift", params=params, headers=h)
        assert res.status_code == 422, (params, res.text)


@pytest.mark.integration
def test_compare_two_arms_and_two_versions(world: World) -> None:
    arms = world.get("/v1/drift/compare", model="mlp", baseline="1.0.0", candidate="1.0.0",
                     baseline_cohort="a", candidate_cohort="b")
    assert arms["drifted_features"] == DRIFTED and arms["outputs_compared"]
    assert arms["baseline"] == {"version": "1.0.0", "cohort": "a", "windows": WINDOWS, "reports": 2 * WINDOWS}
    versions = world.get("/v1/drift/compare", model="mlp", baseline="1.0.0", candidate="1.1.0",
                         baseline_cohort="a", candidate_cohort="a")
    assert versions["drifted_features"] == [] and not versions["dataset_drift"]
    h = world.h("viewer")
    missing = world.client.get("/v1/drift/compare", headers=h,
                               params={"model": "mlp", "baseline": "1.0.0", "candidate": "1.0.0",
                                       "candidate_cohort": "zz"})
    assert missing.status_code == 404 and "cohort 'zz'" in missing.json()["detail"][0]["msg"]
    unknown = world.client.get("/v1/drift/compare", headers=h,
                               params={"model": "mlp", "baseline": "9.9.9", "candidate": "1.0.0"})
    assert unknown.status_code == 404 and "profile" in unknown.json()["detail"][0]["msg"]
    assert world.client.get("/v1/drift/compare", headers=h, params={"model": "mlp"}).status_code == 422
    rebinned = world.client.get("/v1/drift/compare", headers=h,
                                params={"model": "mlp", "baseline": "1.0.0", "candidate": "2.0.0"})
    assert rebinned.status_code == 422
    assert "different reference profiles" in rebinned.json()["detail"][0]["msg"]


@pytest.mark.integration
def test_windows_are_listed_in_pages_with_filters(world: World) -> None:
    everything = _walk(world, "/v1/telemetry/windows", limit=5)
    keys = [(w["window_start"], w["model"], w["version"], w["cohort"]) for w in everything]
    assert len(keys) == 4 * WINDOWS and keys == sorted(set(keys))
    for w in everything:
        assert w["window_end"] - w["window_start"] == 60.0
        assert (w["reports"], w["device_count"], w["errors"]) == (2, 2, 0)
        assert w["requests"] > 0 and 0 < w["latency_p50_s"] <= w["latency_p95_s"]
    second = world.get("/v1/telemetry/windows", since=T0 + 120, until=T0 + 180, limit=20)["items"]
    assert {w["window_start"] for w in second} == {T0 + 120} and len(second) == 4
    b = world.get("/v1/telemetry/windows", model="mlp", version="1.0.0", cohort="b", limit=20)["items"]
    assert [w["window_start"] for w in b] == [T0 + 60 * k for k in range(1, WINDOWS + 1)]
    h = world.h("viewer")
    for params in ({"cursor": "eyJ4Ijog"}, {"until": T0, "since": T0}, {"since": "inf"}):
        assert world.client.get("/v1/telemetry/windows", params=params, headers=h).status_code == 422


@pytest.mark.integration
def test_alerts_triggers_and_acknowledgement(world: World) -> None:
    alerts = _walk(world, "/v1/alerts", limit=2)
    ids = [a["id"] for a in alerts]
    assert ids == sorted(ids, reverse=True) and len(ids) == len(set(ids))
    b_features = {a["subject"] for a in alerts if a["cohort"] == "b" and a["subject"].startswith("feat")}
    assert b_features == set(DRIFTED)  # one drift alert per drifted feature, none for the others
    assert not any(a["cohort"] == "a" and a["subject"].startswith("feat") for a in alerts)
    triggers = world.get("/v1/triggers", limit=20)["items"]
    assert {(t["cohort"], t["subject"]) for t in triggers} >= {("c", "dataset")}
    assert all(t["kind"] == "retrain" and t["windows"] >= 3 for t in triggers)
    assert {t["id"] for t in triggers} == {a["id"] for a in alerts if a["kind"] == "retrain"}
    drift_b = world.get("/v1/alerts", kind="drift", cohort="b", subject="feat3")["items"]
    assert len(drift_b) == 1 and drift_b[0]["acked_at"] is None
    # each alert names its episode; the dataset alert of c names every drifted feature
    (dataset_c,) = world.get("/v1/alerts", kind="drift", cohort="c", subject="dataset")["items"]
    assert dataset_c["episode"] == dataset_c["id"] and dataset_c["escalation"] == 0
    assert dataset_c["features"] == sorted(MLP_FEATURES) and dataset_c["baseline"] == ""

    target = triggers[0]["id"]
    url = f"/v1/alerts/{target}/ack"
    assert world.client.post(url, json={"note": "looking"}, headers=world.h("viewer")).status_code == 403
    assert world.client.post(url, json={"note": "looking"}).status_code == 401
    done = world.client.post(url, json={"note": "retraining job 42"}, headers=world.h("operator"))
    assert done.status_code == 200, done.text
    assert done.json()["acked_by"].endswith(":operator") and done.json()["ack_note"] == "retraining job 42"
    again = world.client.post(url, json={}, headers=world.h("operator"))
    assert again.status_code == 409 and "already acknowledged" in again.json()["detail"][0]["msg"]
    assert world.client.post("/v1/alerts/999999/ack", json={}, headers=world.h("operator")).status_code == 404
    assert [t["id"] for t in world.get("/v1/triggers", acked="true")["items"]] == [target]
    assert target not in [t["id"] for t in _walk(world, "/v1/alerts", acked="false")]
    audit = world.get("/v1/audit", action="alert.ack")["items"]
    assert [(e["resource"], e["after"]["note"]) for e in audit] == [(f"alerts/{target}", "retraining job 42")]
    # /metrics reads the same alert database the routes opened (no drift monitor in this app)
    text = world.client.get("/metrics", headers=world.h("viewer")).text
    counted = {s.labels["cohort"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "edgefleet_alerts_total" and s.labels["kind"] == "retrain"}
    assert counted == {c: float(n) for c, n in Counter(t["cohort"] for t in triggers).items()}

@pytest.mark.integration
def test_every_telemetry_route_needs_a_key(world: World) -> None:
    for url in ("/v1/telemetry/windows", "/v1/drift", "/v1/alerts", "/v1/triggers",
                "/v1/drift/compare?model=mlp&baseline=1.0.0&candidate=1.1.0"):
        res = world.client.get(url)
        assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer", url
        assert world.client.get(url, headers={"Authorization": "Bearer efk_nope"}).status_code == 401


@pytest.mark.integration
def test_alerts_beyond_drift_are_listed_filtered_and_acknowledged(tmp_path: Any) -> None:
    settings = FleetSettings(data_dir=tmp_path / "fleet")
    store = Store(settings.db_path, clock=FakeClock())
    operator = create_api_key(store, "operator", "operator", "test")[1]
    alerts = AlertManager(settings.alerts_db_path, clock=lambda: T0)
    evidence = {"candidate_failure_rate": 0.2, "baseline_failure_rate": 0.01, "z": float("inf")}
    alerts.observe([
        Observation("error_rate", "error_rate", True, T0, "mlp", "2.0.0", "eu", "failure_rate", 0.2, 0.03,
                    baseline="1.0.0", detail="2.0.0 fails 20%", evidence=evidence),
        Observation("offline", "devices", True, T0, statistic="offline_s", value=901.0, threshold=900.0,
                    members=("d1", "d2"), devices=("d1", "d2"))])
    alerts.observe([Observation("offline", "devices", True, T0 + 60, members=("d1", "d2", "d3"),
                                devices=("d1", "d2", "d3"))])
    alerts.close()
    h = {"Authorization": f"Bearer {operator}"}
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        listed = client.get("/v1/alerts", headers=h).json()["items"]
        assert [(a["kind"], a["escalation"]) for a in listed] == [
            ("offline", 1), ("offline", 0), ("error_rate", 0)]
        escalated, offline, regression = listed
        assert escalated["episode"] == offline["id"] and escalated["features"] == ["d1", "d2", "d3"]
        assert escalated["detail"].endswith("new: d3")
        assert regression["baseline"] == "1.0.0"
        assert regression["evidence"]["z"] is None  # inf: not a JSON number
        assert regression["evidence"]["candidate_failure_rate"] == 0.2
        only = client.get("/v1/alerts", params={"kind": "offline"}, headers=h).json()["items"]
        assert [a["id"] for a in only] == [escalated["id"], offline["id"]]
        assert client.get("/v1/alerts", params={"kind": "bogus"}, headers=h).status_code == 422
        acked = client.post(f"/v1/alerts/{regression['id']}/ack", json={"note": "rolled back"}, headers=h)
        assert acked.status_code == 200 and acked.json()["kind"] == "error_rate"
    store.close()
