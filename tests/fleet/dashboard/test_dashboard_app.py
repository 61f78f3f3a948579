"""The dashboard without a browser: sessions, cookies, CSRF, roles, error pages and the charts'
arithmetic, over a `FleetService` app (no broker) driven in-process by Starlette's TestClient.

The browser tests (test_dashboard_browser.py) show the pages work in chromium against a live
fleet; these pin the security rules one by one, fast.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from fleet.access.auth import Principal, create_api_key
from fleet.components import build_components
from fleet.dashboard.charts import HeatValue, heat_map, severity_fill, status_bar
from fleet.dashboard.drift_views import severity
from fleet.dashboard.sessions import SessionStore
from fleet.rollouts.record_types import GateBreach
from fleet.rollouts.records import RolloutRecords
from fleet.service import FleetService
from fleet.settings import FleetSettings
from fleet.telemetry.alerts import AlertManager, Observation
from fleet.telemetry.drift import FeatureDrift
from simulators.cli import demo_command
from tests.support.postgres import Backend


@pytest.fixture
def service(tmp_path: Path, backend: Backend) -> Iterator[FleetService]:
    """The service with its components on each backend (SQLite files, then one PostgreSQL)."""
    settings = FleetSettings(data_dir=tmp_path, database_url=backend.pg_url)
    svc = FleetService(settings, component_factory=lambda store: build_components(settings, store, False))
    try:
        yield svc
    finally:
        svc.store.close()


def _login(client: TestClient, key: str, next_path: str = "/ui/") -> object:
    page = client.get("/ui/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    return client.post("/ui/login", data={"key": key, "login_token": token.group(1), "next": next_path},
                       follow_redirects=False)


def _csrf(client: TestClient) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get("/ui/").text)
    assert found is not None
    return found.group(1)


def _rollout(svc: FleetService) -> str:
    store = svc.store
    store.models.create_model("m", "", "test")
    store.models.register_version("m", "1.0.0", "sha256:" + "0" * 64, "onnx", {}, "test")
    return store.rollouts.create("m:1.0.0", "", {}, {}, "test").id


@pytest.mark.integration
def test_login_sets_a_strict_httponly_expiring_cookie_that_is_not_the_key(
        service: FleetService, caplog: pytest.LogCaptureFixture) -> None:
    key = create_api_key(service.store, "alice", "operator", "test")[1]
    client = TestClient(service.app)
    first = client.get("/ui/devices", follow_redirects=False)
    assert first.headers["location"] == "/ui/login?next=/ui/devices"
    with caplog.at_level(logging.DEBUG):
        res = _login(client, key, "/ui/devices")
    assert res.status_code == 303 and res.headers["location"] == "/ui/devices"  # type: ignore[attr-defined]
    cookie = next(c for c in res.headers.get_list("set-cookie") if c.startswith("ef_session="))  # type: ignore[attr-defined]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    assert "Path=/ui" in cookie and "Secure" not in cookie  # plain http here
    assert key not in cookie and key not in caplog.text
    page = client.get("/ui/devices")
    assert page.status_code == 200 and "alice" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"


@pytest.mark.integration
def test_over_https_the_cookie_is_secure(service: FleetService) -> None:
    key = create_api_key(service.store, "alice", "operator", "test")[1]
    res = _login(TestClient(service.app, base_url="https://testserver"), key)
    assert "Secure" in next(c for c in res.headers.get_list("set-cookie") if c.startswith("ef_session="))  # type: ignore[attr-defined]


@pytest.mark.integration
def test_a_bad_key_or_a_forged_login_form_gets_the_login_page_and_a_sentence(service: FleetService) -> None:
    client = TestClient(service.app)
    res = _login(client, "efk_wrong")
    assert res.status_code == 401 and "unknown or revoked" in res.text  # type: ignore[attr-defined]
    forged = TestClient(service.app).post("/ui/login", data={"key": "efk_x", "login_token": "guess"})
    assert forged.status_code == 400 and "login form expired" in forged.text
    assert "Traceback" not in res.text + forged.text  # type: ignore[attr-defined]


@pytest.mark.integration
def test_posts_need_the_sessions_csrf_token_and_the_operator_role(service: FleetService) -> None:
    rid = _rollout(service)
    operator = TestClient(service.app)
    _login(operator, create_api_key(service.store, "op", "operator", "test")[1])
    viewer = TestClient(service.app)
    _login(viewer, create_api_key(service.store, "view", "viewer", "test")[1])
    assert operator.post(f"/ui/rollouts/{rid}/pause", data={"csrf": "wrong"}).status_code == 403
    assert operator.post(f"/ui/rollouts/{rid}/pause", data={}).status_code == 403
    res = viewer.post(f"/ui/rollouts/{rid}/pause", data={"csrf": _csrf(viewer)})
    assert res.status_code == 403 and "may not do this" in res.text
    assert service.store.rollouts.get(rid).desired == "run"
    res = operator.post(f"/ui/rollouts/{rid}/pause", data={"csrf": _csrf(operator), "note": "n"},
                        follow_redirects=False)
    assert res.status_code == 303
    assert service.store.rollouts.get(rid).desired == "pause"
    entry = service.store.audit.list(None, 1, action="rollout.pause").items[0]
    assert entry.actor.endswith(":op") and entry.after == {"desired": "pause", "note": "n"}
    again = operator.post(f"/ui/rollouts/{rid}/pause", data={"csrf": _csrf(operator)})
    assert again.status_code == 409 and "already asked to pause" in again.text


@pytest.mark.integration
def test_revoking_the_key_ends_its_sessions_and_logout_ends_one(service: FleetService) -> None:
    row, key = create_api_key(service.store, "op", "operator", "test")
    create_api_key(service.store, "admin", "admin", "test")  # the last admin cannot be revoked
    client = TestClient(service.app)
    _login(client, key)
    assert client.get("/ui/").status_code == 200
    service.store.access.revoke_api_key(row.id, "test")
    res = client.get("/ui/", follow_redirects=False)
    assert res.status_code == 303 and "reason=revoked" in res.headers["location"]
    other = TestClient(service.app)
    _login(other, create_api_key(service.store, "op2", "operator", "test")[1])
    csrf = _csrf(other)
    assert other.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert other.get("/ui/", follow_redirects=False).status_code == 303
    htmx = other.get("/ui/fragments/counts", headers={"HX-Request": "true"})
    assert htmx.status_code == 204 and htmx.headers["hx-redirect"].startswith("/ui/login")


@pytest.mark.integration
def test_errors_on_dashboard_paths_are_pages_and_the_api_keeps_json(service: FleetService) -> None:
    client = TestClient(service.app)
    _login(client, create_api_key(service.store, "v", "viewer", "test")[1])
    missing = client.get("/ui/rollouts/ro-nope")
    assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
    assert "rollout &#39;ro-nope&#39; not found" in missing.text
    bad = client.get("/ui/devices", params={"selector": "env in (a"})
    assert bad.status_code == 200 and 'class="error"' in bad.text
    api = client.get("/v1/rollouts/ro-nope")
    assert api.status_code == 401 and api.json()["detail"][0]["msg"].startswith("missing credentials")
    assert not [p for p in service.app.openapi()["paths"] if p.startswith("/ui") or p == "/"]


@pytest.mark.integration
def test_every_page_renders_the_stores_records(service: FleetService) -> None:
    store = service.store
    rid = _rollout(service)
    store.devices.create("dev-1", {"cohort": "eu"}, {"agent_version": "1.2.3", "runtimes": ["onnx"]},
                         "dev-1", "hash", "test")
    store.devices.record_reported_state("dev-1", {"state": "serving", "active_bundle": "m-1.0.0",
                                                  "previous_bundle": None})
    records = RolloutRecords(store)
    records.add_devices(rid, ["dev-1"])
    records.init_runtime(rid, "m-1.0.0", "m/m-1.0.0.tar", 1000.0)
    records.update_runtime(rid, breach=GateBreach(0, False, [
        {"gate": "install_failure_pct", "value": 50.0, "limit": 10.0, "message": "install failures 50 %"}]))
    store.rollouts.set_state(rid, "running", 0, "controller")
    store.rollouts.set_device_status(rid, "dev-1", 0, "succeeded")
    records.command(rid, "promote", "test", "go on")
    client = TestClient(service.app)
    _login(client, create_api_key(store, "op", "operator", "test")[1])

    def page(path: str, *texts: str) -> str:
        res = client.get(path)
        assert res.status_code == 200, (path, res.status_code, res.text[-500:])
        for text in texts:
            assert text in res.text, (path, text)
        return res.text

    page("/ui/", "m-1.0.0", "rollout.create")
    page("/ui/fragments/counts", 'data-count="total">1<')
    page("/ui/devices", "dev-1", "serving", "cohort=eu")
    page("/ui/devices/dev-1", "1.2.3", "/ui/models/m/versions/1.0.0", rid, "succeeded", "device.enroll")
    page("/ui/models", "/ui/models/m/versions/1.0.0", "bundle not in the repository")
    page("/ui/models/m/versions/1.0.0", "m:1.0.0", rid, "registered")
    page("/ui/rollouts", rid, "running", "succeeded 1")
    detail = page(f"/ui/rollouts/{rid}", "m-1.0.0 (forward phase)", "queued: promote",
                  "install failures 50 %", 'data-table="breach"')
    assert 'data-action="pause"' in detail and 'data-action="promote"' not in detail  # promote is queued
    page(f"/ui/rollouts/{rid}/progress", 'data-status="succeeded">1<')
    page(f"/ui/rollouts/{rid}/confirm/abort", "Abort rollout")
    page("/ui/rollouts?state=running", rid)
    page("/ui/experiments", "No experiment yet")
    page("/ui/audit?action=rollout.promote", rid)
    page("/ui/alerts", "No alerts")
    page("/ui/drift", "none yet")


@pytest.mark.integration
def test_a_rolled_back_rollout_and_alerts_beyond_drift_are_shown_as_such(service: FleetService) -> None:
    store = service.store
    rid = _rollout(service)
    store.rollouts.set_state(rid, "running", 0, "controller")
    store.rollouts.set_state(rid, "rolling_back", 0, "controller", "rollback by op: regret")
    store.rollouts.set_state(rid, "rolled_back", 0, "controller", "1 devices back on their previous bundle")
    alerts = AlertManager(service.settings.alerts_database)
    alerts.observe([Observation("offline", "devices", True, 1.0, members=("d1",), devices=("d1",),
                                detail="1 devices offline for more than 900 s")])
    alerts.observe([Observation("offline", "devices", True, 2.0, members=("d1", "d2"), devices=("d1", "d2"),
                                detail="2 devices offline for more than 900 s")])
    alerts.close()
    client = TestClient(service.app)
    _login(client, create_api_key(store, "op", "operator", "test")[1])
    listing = client.get("/ui/rollouts?state=rolled_back")
    assert listing.status_code == 200 and rid in listing.text and "state-rolled_back" in listing.text
    detail = client.get(f"/ui/rollouts/{rid}").text
    assert "rolled_back" in detail and "rollback by op: regret" in detail
    assert not re.search(r'data-action="(pause|abort|rollback|promote)"', detail)  # terminal: no actions
    page = client.get("/ui/alerts?kind=offline")
    assert page.status_code == 200 and "devices offline for more than 900 s" in page.text
    assert 'data-escalation="1"' in page.text and "new: d2" in page.text
    assert client.get("/ui/alerts?kind=bogus").status_code in (400, 422)


@pytest.mark.unit
def test_sessions_expire_after_their_lifetime_and_when_idle_and_are_bounded() -> None:
    now = [1000.0]
    store = SessionStore(ttl_s=100, idle_s=30, max_sessions=2, clock=lambda: now[0])
    who = Principal("k1", "alice", "viewer")
    token, session = store.create(who)
    assert store.get(token) is not None and session.principal.actor == "key:k1:alice"
    now[0] += 29
    assert store.get(token) is not None  # the idle clock restarts on use
    now[0] += 31
    assert store.get(token) is None
    a, _ = store.create(who)
    for _ in range(4):
        now[0] += 20
        assert store.get(a) is not None
    now[0] += 25
    assert store.get(a) is None  # 105 s after login: past the lifetime though never idle
    tokens = [store.create(who)[0] for _ in range(3)]
    assert len(store) == 2 and store.get(tokens[0]) is None and store.get(tokens[2]) is not None
    assert not session.csrf_ok("") and session.csrf_ok(session.csrf)


@pytest.mark.unit
def test_severity_puts_every_method_on_one_scale_with_one_at_the_threshold() -> None:
    ks = FeatureDrift("f", "numeric", "ks_budget", 0.2, 0.1, True, 100, 100, p_value=1e-9)
    chi = FeatureDrift("c", "categorical", "chisquare_budget", 50.0, 1e-4, True, 100, 100, p_value=1e-8)
    none = FeatureDrift("n", "numeric", "insufficient", math.nan, math.nan, False, 100, 3)
    assert severity(ks) == pytest.approx(2.0) and severity(chi) == pytest.approx(2.0)
    assert severity(none) is None
    assert severity_fill(None) == "#d9d9d9" and severity_fill(0.0) == "#f7fbff"
    assert severity_fill(9) == "#7f0000"
    hm = heat_map([("f", "/f"), ("g", "/g")], ["t0", "t1"], {("f", "t1"): HeatValue(2.0, True, "f@t1")})
    assert [(c.row, c.col, c.drifted, c.fill) for c in hm.cells] == [("f", "t1", True, "#7f0000")]
    bar = status_bar({"succeeded": 3, "failed": 1}, width=400)
    assert [(s.title, s.w) for s in bar] == [("succeeded: 3", 300.0), ("failed: 1", 100.0)]


@pytest.mark.unit
def test_the_demo_offers_serve() -> None:
    res = CliRunner().invoke(demo_command, ["--help"])
    assert res.exit_code == 0 and "--serve" in res.output and "login key" in res.output


@pytest.mark.integration
def test_a_rollout_awaiting_approval_shows_it_and_only_an_operator_approves(service: FleetService) -> None:
    store = service.store
    store.models.create_model("m", "", "test")
    store.models.register_version("m", "1.0.0", "sha256:" + "0" * 64, "onnx", {}, "test")
    rid = store.rollouts.create("m:1.0.0", "", {"kind": "canary", "stages": [50, 100],
                                                "approval": {"stages": [0], "timeout_s": 600},
                                                "budget": {"group_by": ["site"], "max_unavailable": 1}},
                                {}, "test").id
    records = RolloutRecords(store)
    records.init_runtime(rid, "m-1.0.0", "m/m-1.0.0.tar", 1000.0)
    records.update_runtime(rid, approval_requested_at=1000.0)
    store.rollouts.set_state(rid, "awaiting_approval", 0, "controller")
    operator = TestClient(service.app)
    _login(operator, create_api_key(store, "op", "operator", "test")[1])
    viewer = TestClient(service.app)
    _login(viewer, create_api_key(store, "view", "viewer", "test")[1])
    detail = operator.get(f"/ui/rollouts/{rid}").text
    assert "Stage 1 waits for an operator's approval" in detail and "will pause at" in detail
    assert 'data-action="approve"' in detail and 'data-action="promote"' not in detail
    assert "disruption budget per site: at most 1 unavailable" in detail
    assert "Approve rollout" in operator.get(f"/ui/rollouts/{rid}/confirm/approve").text
    assert 'data-action="approve"' not in viewer.get(f"/ui/rollouts/{rid}").text
    res = viewer.post(f"/ui/rollouts/{rid}/approve", data={"csrf": _csrf(viewer)})
    assert res.status_code == 403 and records.pending_commands(rid) == []
    res = operator.post(f"/ui/rollouts/{rid}/approve", data={"csrf": _csrf(operator), "note": "go"},
                        follow_redirects=False)
    assert res.status_code == 303
    assert [(c.command, c.note) for c in records.pending_commands(rid)] == [("approve", "go")]
    entry = store.audit.list(None, 1, action="rollout.approve").items[0]
    assert entry.actor.endswith(":op")
