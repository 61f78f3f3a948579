"""Prometheus /metrics on a real fleet service (uvicorn, Mosquitto, SQLite) and the Grafana dashboard.

Telemetry and chunk requests travel over the real broker to the real publisher; the drift
monitor evaluates the windows; the scrape must show all of it, and every metric name the
dashboard queries must be one the scrape really exports.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from agent.contract.protocol import ObjectRequest, Topics, encode_request
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.api.deps import ApiCollaborators
from fleet.components import ServeConfig, build_components
from fleet.delivery.publisher import Publisher
from fleet.metrics import RECENT_ROLLOUTS, FleetMetrics, MetricSources
from fleet.rollouts.controller import RolloutController
from fleet.rollouts.records import RolloutRecords
from fleet.service import FleetService
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.alerts import AlertManager
from fleet.telemetry.ingest import TelemetryStore
from fleet.telemetry.monitor import DriftMonitor
from tests.support.broker import Broker, free_port
from tests.support.fakes import DIGEST, FakeClock
from tests.support.postgres import Backend
from tests.support.report_signing import enroll_keys
from tests.support.telemetry import MLP_FEATURES, T0, column_shift, encoded_reports, mlp_outputs, publish_mlp

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "edgefleet-dashboard.json"
PREFIX = "ef-metrics"
DEVICE = "metrics-dev"
REPORTS = 6  # 2 devices x 3 windows


@dataclass
class Served:
    base: str
    keys: dict[str, str]
    monitor: DriftMonitor
    publisher: Publisher
    controller: RolloutController
    start: float

    def h(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def scrape(self) -> dict[str, Any]:
        res = httpx.get(f"{self.base}/metrics", headers=self.h("viewer"), timeout=10)
        assert res.status_code == 200, res.text
        return {"text": res.text, "families": list(text_string_to_metric_families(res.text))}


def _wait(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        done.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, mosquitto: Broker) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("metrics")
    settings = FleetSettings(data_dir=tmp / "fleet", port=free_port(), broker_url=mosquitto.url,
                             topic_prefix=PREFIX)
    service = FleetService(settings, component_factory=lambda st: build_components(
        settings, st, with_broker=True, config=ServeConfig(controller_tick_s=0.2)))
    service.start_background()
    device = MqttTransport(MqttConfig(port=mosquitto.port, client_id=DEVICE))
    try:
        keys = {r: create_api_key(service.store, r, r, "test")[1] for r in ("viewer", "operator", "admin")}
        monitor = next(c for c in service.components if isinstance(c, DriftMonitor))
        publisher = next(c.publisher for c in service.components if hasattr(c, "publisher"))
        base = f"http://127.0.0.1:{settings.port}"
        profile = publish_mlp(settings, service.store, "1.0.0", tmp)
        with httpx.Client(base_url=base, timeout=10) as api:
            op = {"Authorization": f"Bearer {keys['operator']}"}
            token = api.post("/v1/enrollment-tokens", json={"labels": {"env": "prod"}}, headers=op).json()
            dev = api.post("/v1/enroll", json={"agent_version": "0.1.0", "runtimes": ["onnx"]},
                           headers={"Authorization": f"Bearer {token['token']}"}).json()["device_id"]
            service.store.devices.record_reported_state(
                dev, {"device_id": dev, "state": "idle", "online": True, "agent_version": "0.1.0"})
            res = api.post("/v1/rollouts", json={"model_version_id": "mlp:1.0.0", "selector": "env=prod"},
                           headers=op)
            assert res.status_code == 201, res.text
        # Telemetry and chunk requests as a device sends them, over the broker.
        device.connect(10)
        topics = Topics(PREFIX)
        key = enroll_keys(service.store, [DEVICE])[DEVICE]  # the fleet takes signed reports only
        start = math.floor(time.time() / 60) * 60 - 600  # three windows, all closed by now
        shift = column_shift(32, [3, 17], 1.5)
        for payload in [*encoded_reports(profile, "mlp", "1.0.0", "b", 2, [shift] * 3, mlp_outputs,
                                         start=start), b"\x00junk"]:
            device.publish(topics.telemetry(DEVICE), payload, user_properties=key.props("telemetry", payload))
        for i, path in enumerate(("metadata/1.root.json", "metadata/99.root.json")):
            rid = f"{i + 1:08x}"
            device.publish(topics.requests(DEVICE), encode_request(ObjectRequest(
                request_id=rid, path=path, offset=0, length=4096)),
                response_topic=topics.responses(DEVICE), correlation_data=bytes.fromhex(rid))
        counters = monitor.telemetry.counters
        _wait(lambda: counters.accepted == REPORTS and counters.rejected == 1, "telemetry ingest")
        _wait(lambda: publisher.chunks_sent >= 1 and publisher.refused[404] >= 1, "chunk requests")
        assert monitor.run_once()  # drift alerts for feat3 and feat17
        controller = next(c for c in service.components if isinstance(c, RolloutController))
        yield Served(base, keys, monitor, publisher, controller, start)
    finally:
        device.close()
        service.stop()


def _samples(families: list[Any], name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in families for s in f.samples if s.name == name]


def _value(families: list[Any], name: str, **labels: str) -> float:
    found = [v for lab, v in _samples(families, name) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.mark.integration
def test_metrics_need_a_viewer_key_by_default(served: Served) -> None:
    url = f"{served.base}/metrics"
    anon = httpx.get(url, timeout=10)
    assert anon.status_code == 401 and anon.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url, headers={"Authorization": "Bearer efk_nope"}, timeout=10).status_code == 401
    ok = httpx.get(url, headers=served.h("viewer"), timeout=10)
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain; version=")


@pytest.mark.integration
def test_scrape_shows_fleet_rollouts_telemetry_drift_alerts_publisher_and_api(served: Served) -> None:
    fam = served.scrape()["families"]
    assert _value(fam, "edgefleet_devices", state="idle", online="true") == 1
    assert _value(fam, "edgefleet_device_agent_versions", agent_version="0.1.0") == 1
    assert sum(v for _, v in _samples(fam, "edgefleet_rollouts")) == 1
    assert {lab["model_version"] for lab, _ in _samples(fam, "edgefleet_rollout_stage")} == {"mlp:1.0.0"}

    assert _value(fam, "edgefleet_telemetry_reports_total", result="accepted") == REPORTS
    assert _value(fam, "edgefleet_telemetry_rejected_total", reason="malformed") == 1
    assert _value(fam, "edgefleet_telemetry_ingest_seconds_count") == REPORTS + 1

    detected = {lab["feature"]: v for lab, v in _samples(fam, "edgefleet_drift_detected")}
    assert {f for f, v in detected.items() if v == 1 and not f.startswith("output:")} == {"feat3", "feat17"}
    assert set(MLP_FEATURES) <= set(detected)
    stats = _samples(fam, "edgefleet_drift_statistic")
    assert {lab["statistic"] for lab, _ in stats} == {"ks_budget"}
    feat3 = next(v for lab, v in stats if lab["feature"] == "feat3")
    assert feat3 > _value(fam, "edgefleet_drift_threshold", feature="feat3")
    assert _value(fam, "edgefleet_dataset_drift", model="mlp", version="1.0.0", cohort="b") == 0
    assert _value(fam, "edgefleet_drift_share", cohort="b") == pytest.approx(2 / 32)
    assert _value(fam, "edgefleet_drift_evaluations_total") == 3
    assert _value(fam, "edgefleet_alerts_total", kind="drift", cohort="b") >= 2
    assert _value(fam, "edgefleet_alerts_undelivered", kind="drift") == 0  # no webhook: nothing to deliver

    # model serving, per version x cohort (the reports: 1 request of 2 ms each, no RSS measured)
    key = {"model": "mlp", "version": "1.0.0", "cohort": "b"}
    assert _value(fam, "edgefleet_model_requests_total", **key) == REPORTS
    assert _value(fam, "edgefleet_model_errors_total", **key) == 0
    assert _value(fam, "edgefleet_model_rejected_total", **key) == 0
    assert _value(fam, "edgefleet_model_latency_seconds_count", **key) == REPORTS
    assert _value(fam, "edgefleet_model_latency_seconds_sum", **key) == pytest.approx(REPORTS * 0.002)
    buckets = {float(lab["le"]): v for lab, v in _samples(fam, "edgefleet_model_latency_seconds_bucket")}
    assert buckets[0.002048] == REPORTS and buckets[0.001024] == 0 and buckets[math.inf] == REPORTS
    assert _value(fam, "edgefleet_model_devices_reporting", **key) == 2
    assert _value(fam, "edgefleet_model_rss_max_bytes", **key) == 0
    assert _value(fam, "edgefleet_model_cpu_seconds_total", **key) == 0
    assert _value(fam, "edgefleet_model_devices", bundle="none", online="true") == 1
    assert not [lab for lab, _ in _samples(fam, "edgefleet_model_requests_total") if "device" in lab]

    assert _value(fam, "edgefleet_publisher_chunks_total") >= 1
    assert _value(fam, "edgefleet_publisher_bytes_total") >= 100
    assert _value(fam, "edgefleet_publisher_refusals_total", status="404") >= 1
    created = _value(fam, "edgefleet_api_requests_total", method="POST", route="/v1/rollouts", status="201")
    assert created == 1
    assert not _samples(fam, "edgefleet_scrape_errors_total")


@pytest.mark.integration
def test_rollout_gates_read_drift_through_the_monitor(served: Served) -> None:
    """`fleet serve` wires the gates' drift score to the monitor (bundle profile + merged windows)."""
    assert served.controller.metrics is not None
    seen = served.controller.metrics.version_metrics("mlp", "1.0.0", served.start)
    assert seen is not None and seen.requests > 0
    assert seen.drift_score == pytest.approx(2 / 32)
    assert served.controller.metrics.version_metrics("mlp", "9.9.9", served.start) is None


@pytest.mark.integration
def test_telemetry_routes_read_the_running_monitor(served: Served) -> None:
    with httpx.Client(base_url=served.base, headers=served.h("viewer"), timeout=10) as api:
        drift = api.get("/v1/drift", params={"model": "mlp", "version": "1.0.0", "cohort": "b"}).json()
        assert drift["items"][0]["drifted_features"] == ["feat3", "feat17"]
        alerts = api.get("/v1/alerts", params={"kind": "drift", "cohort": "b", "limit": 50}).json()["items"]
        assert {a["subject"] for a in alerts if a["subject"].startswith("feat")} == {"feat3", "feat17"}
        windows = api.get("/v1/telemetry/windows", params={"model": "mlp"}).json()["items"]
        assert [w["reports"] for w in windows] == [2, 2, 2]


@pytest.mark.integration
def test_every_dashboard_query_uses_exported_metric_names(served: Served) -> None:
    httpx.get(f"{served.base}/v1/rollouts", headers=served.h("viewer"), timeout=10)  # an API sample
    exported: set[str] = set()
    families: set[str] = set()
    for f in served.scrape()["families"]:
        families.add(f.name)
        exported |= {s.name for s in f.samples}
        exported |= {f"{f.name}{suffix}" for suffix in {
            "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[f.type]}
    dash = json.loads(DASHBOARD.read_text())
    assert dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" for v in dash["templating"]["list"])
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used: set[str] = set()
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]
        for t in p["targets"]:
            names = set(re.findall(r"\bedgefleet_[a-z0-9_]+", t["expr"]))
            assert names, (p["title"], t["expr"])
            assert names <= exported, (p["title"], names - exported)
            used |= names
    for v in dash["templating"]["list"]:
        assert set(re.findall(r"\bedgefleet_[a-z0-9_]+", json.dumps(v))) <= exported
    # and the reverse: every exported family is on the dashboard in some form
    unused = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not unused, unused


@pytest.mark.integration
def test_public_metrics_route_templates_and_failing_sources(tmp_path: Path) -> None:
    settings = FleetSettings(data_dir=tmp_path, metrics_public=True)
    store = Store(settings.db_path)
    key = create_api_key(store, "v", "viewer", "test")[1]
    telemetry = TelemetryStore(tmp_path / "telemetry.db")
    alerts = AlertManager(tmp_path / "alerts.db")
    monitor = DriftMonitor(telemetry, alerts, lambda m, v: None)
    app = create_app(settings, store, collaborators=ApiCollaborators(monitor=monitor))
    alerts.close()  # the alert database is gone: its families drop out, the rest is served
    with TestClient(app) as client:
        h = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/rollouts/ro-abcdef", headers=h).status_code == 404
        assert client.get("/v1/rollouts/ro-123456", headers=h).status_code == 404
        assert client.get("/nowhere").status_code == 404
        res = client.get("/metrics")  # public: no key needed
        assert res.status_code == 200
    fam = list(text_string_to_metric_families(res.text))
    assert _value(fam, "edgefleet_api_requests_total", method="GET", route="/v1/rollouts/{rollout_id}",
                  status="404") == 2
    assert _value(fam, "edgefleet_api_requests_total", route="<unmatched>", status="404") == 1
    assert "ro-abcdef" not in res.text
    assert _value(fam, "edgefleet_scrape_errors_total", source="alerts") == 1
    assert not _samples(fam, "edgefleet_alerts_total") and _samples(fam, "edgefleet_rollouts")
    assert _value(fam, "edgefleet_telemetry_reports_total", result="accepted") == 0
    telemetry.close()
    store.close()


@pytest.mark.integration
def test_rollout_series_cover_unfinished_and_recent_finished_rollouts(backend: Backend) -> None:
    clock = FakeClock()
    store = Store(backend.location("fleet.db"), clock=clock)
    store.models.create_model("mlp", "", "test")
    store.models.register_version("mlp", "1.0.0", DIGEST, "onnx", {}, "test")
    for i in range(3):
        store.devices.create(f"d{i}", {"env": "prod"}, {}, f"d{i}", "x", "test")
    finished = []
    for _ in range(RECENT_ROLLOUTS + 2):
        rid = store.rollouts.create("mlp:1.0.0", "env=prod", {}, {}, "test").id
        clock.advance(1)
        store.rollouts.set_state(rid, "completed", 1, "test")
        finished.append(rid)
    running = store.rollouts.create("mlp:1.0.0", "env=prod", {}, {}, "test").id
    store.rollouts.set_state(running, "running", 2, "test")
    records = RolloutRecords(store)
    records.add_devices(running, ["d0", "d1", "d2"])
    records.update_device(running, "d0", "succeeded", outcome="succeeded")
    records.update_device(running, "d1", "failed", outcome="install_failed")

    fam = list(text_string_to_metric_families(
        FleetMetrics(lambda api: MetricSources(store=store, api=api)).render().decode()))
    assert _value(fam, "edgefleet_rollouts", state="completed") == RECENT_ROLLOUTS + 2
    assert _value(fam, "edgefleet_rollouts", state="running") == 1
    staged = {lab["rollout"]: v for lab, v in _samples(fam, "edgefleet_rollout_stage")}
    assert set(staged) == {running, *finished[2:]} and staged[running] == 2  # the 2 oldest dropped
    assert {lab["status"]: v for lab, v in _samples(fam, "edgefleet_rollout_devices")} == {
        "succeeded": 1, "failed": 1, "pending": 1}
    assert {lab["outcome"]: v for lab, v in _samples(fam, "edgefleet_rollout_outcomes")} == {
        "succeeded": 1, "install_failed": 1}
    assert not _samples(fam, "edgefleet_telemetry_reports_total")  # no ingest in this process
    store.close()


@pytest.mark.integration
def test_serving_series_are_per_version_and_cohort_bounded_and_exact_across_a_restart(
        backend: Backend, tmp_path: Path) -> None:
    store = Store(backend.location("fleet.db"))
    profile = publish_mlp(FleetSettings(data_dir=tmp_path / "fleet"), store, "1.0.0", tmp_path)
    clock = FakeClock(T0 + 10_000)
    telemetry = TelemetryStore(backend.location("telemetry.db"), clock=clock)
    for i, cohort in enumerate(("a", "b", "c")):  # 3 devices each: series per cohort, not per device
        clock.advance(10)  # written in this order: c is the most recent key
        for payload in encoded_reports(profile, "mlp", "1.0.0", cohort, 3, [0.0, 0.0], mlp_outputs, seed=i):
            assert telemetry.ingest(payload) == "accepted"
        telemetry.flush()

    def scrape(limit: int) -> list[Any]:
        sources = MetricSources(store=store, telemetry=telemetry, max_serving_series=limit, clock=clock)
        return list(text_string_to_metric_families(FleetMetrics(lambda api: sources).render().decode()))

    fam = scrape(500)
    counted = {lab["cohort"]: v for lab, v in _samples(fam, "edgefleet_model_requests_total")}
    assert counted == {"a": 6, "b": 6, "c": 6}  # 3 devices x 2 windows, one request each
    latency = _samples(fam, "edgefleet_model_latency_seconds_count")
    assert {lab["cohort"] for lab, _ in latency} == {"a", "b", "c"}
    capped = scrape(2)
    assert {lab["cohort"] for lab, _ in _samples(capped, "edgefleet_model_requests_total")} == {"b", "c"}
    # a replayed report adds nothing; a restarted store reads the same totals back
    again = encoded_reports(profile, "mlp", "1.0.0", "a", 3, [0.0, 0.0], mlp_outputs, seed=0)[0]
    assert telemetry.ingest(again) == "duplicate"
    telemetry.close()
    telemetry = TelemetryStore(backend.location("telemetry.db"), clock=clock)
    assert {lab["cohort"]: v for lab, v in _samples(scrape(500), "edgefleet_model_requests_total")} == counted
    # hours later, nothing was heard from these keys: they leave the exposition
    clock.advance(2 * 86_400)
    assert not _samples(scrape(500), "edgefleet_model_requests_total")
    telemetry.close()
    store.close()
