"""Rollout site policies through the admin API: refusals at creation (400) and approvals by role."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.settings import FleetSettings
from fleet.store import Store
from tests.support.fakes import DIGEST, FakeClock

WINDOW = {"cron": "0 2 * * *", "duration_s": 7200}


@dataclass
class Api:
    client: TestClient
    store: Store
    keys: dict[str, str]

    def h(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def create(self, strategy: dict[str, Any], selector: str = "env=prod") -> Any:
        return self.client.post("/v1/rollouts", headers=self.h("operator"), json={
            "model_version_id": "m:1.0.0", "selector": selector, "strategy": strategy})


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    store = Store(tmp_path / "fleet.db", clock=FakeClock())
    keys = {role: create_api_key(store, role, role, "test")[1] for role in ("admin", "operator", "viewer")}
    store.models.create_model("m", "", "test")
    store.models.register_version("m", "1.0.0", DIGEST, "onnx", {}, "test")
    for i in range(3):
        labels = {"env": "prod", "site": "a", "tz": "Europe.Berlin"}
        store.devices.create(f"a{i}", labels, {}, f"a{i}", "$7$x", "test")
    store.devices.create("b0", {"env": "prod", "site": "b", "tz": "Mars.Olympus"}, {}, "b0", "$7$x", "test")
    with TestClient(create_app(FleetSettings(data_dir=tmp_path), store), raise_server_exceptions=False) as c:
        yield Api(c, store, keys)
    store.close()


def _problem(res: Any) -> dict[str, Any]:
    assert res.status_code == 400, res.text
    body = res.json()
    assert set(body) == {"detail"} and len(body["detail"]) >= 1
    item = body["detail"][0]
    assert set(item) >= {"loc", "msg", "type"}
    return dict(item)


@pytest.mark.integration
def test_a_malformed_cron_or_unknown_zone_is_a_400_naming_the_field(api: Api) -> None:
    bad = _problem(api.create({"windows": {"activation": {"cron": "0 25 * * *", "duration_s": 600}}},
                              selector="site=a"))
    assert bad["loc"] == ["body", "strategy", "windows", "activation", "cron"]
    assert "malformed cron expression" in bad["msg"]
    four = _problem(api.create({"windows": {"download": {"cron": "0 2 * *", "duration_s": 600}}}))
    assert four["loc"][:3] == ["body", "strategy", "windows"]
    zone = _problem(api.create({"windows": {"activation": WINDOW, "tz": "Europe/Atlantis"}},
                               selector="site=a"))
    assert zone["loc"] == ["body", "strategy", "windows", "tz"] and "unknown time zone" in zone["msg"]
    label = _problem(api.create({"windows": {"activation": WINDOW}}))  # b0's tz label names no zone
    assert label["loc"] == ["body", "strategy", "windows"] and "b0" in label["msg"]
    ok = api.create({"windows": {"activation": WINDOW}}, selector="site=a")
    assert ok.status_code == 201, ok.text


@pytest.mark.integration
def test_a_budget_that_would_starve_a_group_is_a_400(api: Api) -> None:
    starved = _problem(api.create({"budget": {"group_by": ["site"], "min_available": 3}}))
    assert starved["loc"] == ["body", "strategy", "budget"]
    assert "site=a (3 devices)" in starved["msg"] and "site=b (1 devices)" in starved["msg"]
    zero = _problem(api.create({"budget": {"group_by": ["site"], "max_unavailable": 0}}))
    assert zero["loc"] == ["body", "strategy", "budget"] and "max_unavailable 0" in zero["msg"]
    pct = _problem(api.create({"budget": {"group_by": ["site"], "max_unavailable": "150%"}}))
    assert pct["loc"][:4] == ["body", "strategy", "budget", "max_unavailable"]
    ok = api.create({"budget": {"group_by": ["site"], "max_unavailable": 1}}, selector="site=a")
    assert ok.status_code == 201, ok.text
    # the rest of a bad strategy stays a 422, like every invalid field
    assert api.create({"kind": "bogus"}).status_code == 422


@pytest.mark.integration
def test_only_an_operator_approves_and_only_what_awaits_approval(api: Api) -> None:
    res = api.create({"kind": "all_at_once", "approval": {"stages": [0], "timeout_s": 600}},
                     selector="site=a")
    rid = res.json()["id"]
    approve = f"/v1/rollouts/{rid}/approve"
    early = api.client.post(approve, json={}, headers=api.h("operator"))
    assert early.status_code == 409 and "not awaiting approval" in early.json()["detail"][0]["msg"]
    api.store.rollouts.set_state(rid, "awaiting_approval", 0, "controller")  # as the controller would
    viewer = api.client.post(approve, json={}, headers=api.h("viewer"))
    assert viewer.status_code == 403
    assert viewer.json()["detail"][0]["loc"] == ["header", "Authorization"]
    assert api.client.post(approve, json={}, headers={}).status_code == 401
    ok = api.client.post(approve, json={"note": "site a ready"}, headers=api.h("operator"))
    assert ok.status_code == 202 and ok.json()["state"] == "awaiting_approval"
    again = api.client.post(approve, json={}, headers=api.h("operator"))
    assert again.status_code == 409 and "pending approve" in again.json()["detail"][0]["msg"]
    audit = api.store.audit.list(None, 10, action="rollout.approve").items
    assert [(e.after["command"], e.after["note"]) for e in audit] == [("approve", "site a ready")]
    status = api.client.get(f"/v1/rollouts/{rid}/status", headers=api.h("viewer")).json()
    assert status["state"] == "awaiting_approval"
