"""Rollouts the API refuses or warns about: unparsable selectors, empty cohorts, model changes."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agent.contract.bundle import write_bundle
from agent.contract.manifest import Manifest, TensorSpec
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.errors import Conflict
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from tests.support.fakes import DIGEST, FakeClock

MODEL = bytes(range(256)) * 4  # the format does not look inside


@dataclass
class Api:
    client: TestClient
    store: Store
    settings: FleetSettings
    headers: dict[str, str]

    def create(self, selector: str, version: str = "m:1.0.0", **extra: object) -> tuple[int, dict]:
        res = self.client.post("/v1/rollouts", headers=self.headers,
                               json={"model_version_id": version, "selector": selector, **extra})
        return res.status_code, res.json()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    settings = FleetSettings(data_dir=tmp_path)
    store = Store(settings.db_path, clock=FakeClock())
    key = create_api_key(store, "op", "operator", "test")[1]
    store.models.create_model("m", "", "test")
    store.models.register_version("m", "1.0.0", DIGEST, "onnx", {}, "test")
    store.devices.create("dev-1", {"site": "lab"}, {}, "dev-1", "$7$x", "test")
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield Api(client, store, settings, {"Authorization": f"Bearer {key}"})
    store.close()


@pytest.mark.integration
@pytest.mark.parametrize("typo", ["site==", "site="])
def test_selector_without_value_is_refused_with_422(api: Api, typo: str) -> None:
    code, body = api.create(typo)
    assert code == 422, body
    message = body["detail"][0]["msg"]
    assert "no value after" in message and repr(typo) in message
    assert api.store.rollouts.list(None, 10).items == []


@pytest.mark.integration
def test_empty_cohort_is_warned_in_answer_status_and_log(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgefleet.fleet.rollouts"):
        code, body = api.create("site=nowhere")
    assert code == 201, body
    assert body["warnings"] == ["cohort matches no device"]
    assert any(r.message == "rollout.empty_cohort" and getattr(r, "selector", None) == "site=nowhere"
               for r in caplog.records)
    rid = body["id"]
    assert api.client.get(f"/v1/rollouts/{rid}", headers=api.headers).json()["warnings"] == [
        "cohort matches no device"]
    status = api.client.get(f"/v1/rollouts/{rid}/status", headers=api.headers).json()
    assert status["warnings"] == ["cohort matches no device"]
    code, ok = api.create("site=lab")
    assert code == 201 and ok["warnings"] == []
    assert api.client.get(f"/v1/rollouts/{ok['id']}/status", headers=api.headers).json()["warnings"] == []


@pytest.mark.integration
def test_a_stored_unparsable_selector_is_reported_not_raised(api: Api) -> None:
    _, body = api.create("site=nowhere")
    with api.store.tx() as db:  # a row stored before selectors got stricter
        db.execute("UPDATE rollouts SET selector = 'site=' WHERE id = :id", {"id": body["id"]})
    res = api.client.get(f"/v1/rollouts/{body['id']}/status", headers=api.headers)
    assert res.status_code == 200
    assert res.json()["warnings"][0] == "cohort matches no device"
    assert "cannot be parsed" in res.json()["warnings"][1]


def _publish(api: Api, repo: Repository, name: str, version: str, inputs: int) -> None:
    manifest = Manifest(name=name, version=version, runtime="onnx", model_file="model.onnx",
                        model_digest="sha256:" + hashlib.sha256(MODEL).hexdigest(), model_size=len(MODEL),
                        inputs=[TensorSpec(name="x", dtype="float32", shape=[None, inputs])],
                        outputs=[TensorSpec(name="probs", dtype="float32", shape=[None, 2])])
    blob = write_bundle(manifest, MODEL, api.settings.data_dir / f"{name}-{version}.efb")
    path = f"models/{name}/{name}-{version}.efb"
    repo.add_target(blob, path, {"name": name, "version": version})
    with contextlib.suppress(Conflict):  # a later version of the same model
        api.store.models.create_model(name, "", "test")
    api.store.models.register_version(name, version, DIGEST, "onnx", {}, "test", bundle_target=path)


@pytest.mark.integration
def test_a_rollout_that_changes_the_cohorts_model_or_schema_is_refused(api: Api) -> None:
    repo = Repository(api.settings.repo_dir, KeyStore(api.settings.keys_dir))
    repo.init(root_threshold=1, root_keys=1)
    _publish(api, repo, "sensor-clf", "1.0.0", inputs=6)
    _publish(api, repo, "sensor-clf", "1.1.0", inputs=6)
    _publish(api, repo, "sensor-clf", "2.0.0", inputs=8)
    _publish(api, repo, "mlp", "1.0.0", inputs=32)
    for dev in ("dev-2", "dev-3"):
        api.store.devices.create(dev, {"site": "plant"}, {}, dev, "$7$x", "test")
        api.store.devices.record_reported_state(dev, {"state": "idle", "active_bundle": "sensor-clf-1.0.0"})

    code, body = api.create("site=plant", "mlp:1.0.0")
    assert code == 409, body
    assert "2 device(s) (dev-2, dev-3) serve sensor-clf-1.0.0: model 'sensor-clf', not 'mlp'" \
        in body["detail"][0]["msg"]
    code, body = api.create("site=plant", "sensor-clf:2.0.0")
    assert code == 409 and "inputs x:float32[?,6]" in body["detail"][0]["msg"], body
    assert api.store.rollouts.list(None, 10).items == []

    assert api.create("site=plant", "sensor-clf:1.1.0")[0] == 201  # same model, same schema
    code, body = api.create("site=plant", "mlp:1.0.0", allow_model_change=True)
    assert code == 201, body
