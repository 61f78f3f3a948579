"""Errors the attack on a running fleet found: 500s on bad server paths, an error shape the
OpenAPI document did not declare, 422 for an oversized chunked upload, uploads capped at the
JSON body limit, an undocumented 400 for malformed JSON."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.contract.bundle import write_bundle
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.components import ensure_trust
from fleet.settings import FleetSettings, Limits
from fleet.store import Store
from simulators.models import make_mlp_onnx, mlp_manifest


@dataclass
class Api:
    client: TestClient
    settings: FleetSettings
    keys: dict[str, str]

    def h(self, role: str = "operator", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}", **extra}

    def documented(self, method: str, path: str) -> dict[str, Any]:
        doc = self.client.get("/openapi.json").json()
        return dict(doc["paths"][path][method]["responses"])


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    settings = FleetSettings(data_dir=tmp_path / "data", limits=Limits(max_upload_bytes=64 * 1024 * 1024))
    settings.import_dir.mkdir(parents=True)
    store = Store(settings.db_path)
    keys = {role: create_api_key(store, role, role, "test")[1] for role in ("viewer", "operator")}
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield Api(client, settings, keys)
    store.close()


def _assert_error_shape(body: Any) -> list[dict[str, Any]]:
    """The API's one error shape (`fleet/api/error_shape.py`)."""
    assert isinstance(body, dict) and isinstance(body["detail"], list) and body["detail"], body
    for item in body["detail"]:
        assert isinstance(item["loc"], list) and isinstance(item["msg"], str), item
        assert isinstance(item["type"], str), item
    return list(body["detail"])


@pytest.mark.integration
@pytest.mark.parametrize("bad", ["a\x00b", "x" * 300, "d/" * 200 + "y" * 300, "../" + "z" * 256])
@pytest.mark.parametrize("route", ["/v1/models/m/versions/from-bundle", "/v1/models/import-mlflow"])
def test_any_invalid_server_path_is_a_422_naming_the_field(api: Api, route: str, bad: str) -> None:
    body: dict[str, str] = {"path": bad}
    if "mlflow" in route:
        body |= {"model": "m", "version": "1.0.0"}
    res = api.client.post(route, json=body, headers=api.h())
    assert res.status_code == 422, res.text
    (item,) = _assert_error_shape(res.json())
    assert item["loc"] == ["body", "path"]


@pytest.mark.integration
def test_every_error_answer_has_the_one_documented_shape(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    error = doc["components"]["schemas"]["Error"]
    assert error["properties"]["detail"]["type"] == "array" and "HTTPValidationError" not in doc["components"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
    c, op = api.client, api.h()
    assert c.post("/v1/models", json={"name": "m"}, headers=op).status_code == 201
    answers = {
        "domain 422 (bad selector)": (c.get("/v1/devices", params={"selector": "a in ("}, headers=op), 422,
                                      "get", "/v1/devices"),
        "schema 422": (c.post("/v1/models", json={"name": "NO"}, headers=op), 422, "post", "/v1/models"),
        "404": (c.get("/v1/models/absent", headers=op), 404, "get", "/v1/models/{name}"),
        "409": (c.post("/v1/models", json={"name": "m"}, headers=op), 409, "post", "/v1/models"),
        "401": (c.get("/v1/models"), 401, "get", "/v1/models"),
        "403": (c.post("/v1/models", json={"name": "v"}, headers=api.h("viewer")), 403, "post", "/v1/models"),
        "413": (c.post("/v1/models", content=b"{" * (2 * 1024 * 1024),
                       headers=api.h(**{"Content-Type": "application/json"})), 413, "post", "/v1/models"),
    }
    for name, (res, status, method, path) in answers.items():
        assert res.status_code == status, (name, res.text)
        _assert_error_shape(res.json())
        assert str(status) in api.documented(method, path), (name, method, path)
    assert answers["401"][0].json()["detail"][0]["loc"] == ["header", "Authorization"]
    assert "unbalanced" in answers["domain 422 (bad selector)"][0].json()["detail"][0]["msg"]
    _assert_error_shape(c.get("/no/such/route").json())


@pytest.mark.integration
def test_malformed_json_answers_a_documented_error(api: Api) -> None:
    documented = api.documented("post", "/v1/models")
    h = api.h(**{"Content-Type": "application/json"})
    syntax = api.client.post("/v1/models", content=b'{"name": ', headers=h)
    assert syntax.status_code == 422 and _assert_error_shape(syntax.json())[0]["type"] == "json_invalid"
    encoding = api.client.post("/v1/models", content=b'{"name": "\xff"}', headers=h)
    assert encoding.status_code == 400 and _assert_error_shape(encoding.json())[0]["loc"] == ["body"]
    assert {"400", "422"} <= set(documented)


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body without Content-Length (sent chunked)."""
    for _ in range(total // size):
        yield b"\0" * size


@pytest.mark.integration
def test_a_chunked_body_over_the_limit_answers_413(api: Api) -> None:
    upload = api.client.post("/v1/models/m/versions/upload", content=_chunks(65 * 1024 * 1024),
                             headers=api.h(**{"Content-Type": "application/octet-stream"}))
    assert upload.status_code == 413, upload.text
    assert "larger than 67108864 bytes" in _assert_error_shape(upload.json())[0]["msg"]
    json_body = api.client.post("/v1/models", content=_chunks(2 * 1024 * 1024),
                                headers=api.h(**{"Content-Type": "application/json"}))
    assert json_body.status_code == 413, json_body.text
    assert not list(api.settings.data_dir.glob("upload-*"))  # the partial upload was removed


@pytest.mark.integration
def test_a_bundle_far_above_the_json_body_limit_uploads(api: Api, tmp_path: Path) -> None:
    sizes = (32, 2600, 2400, 4)  # ~25 MB of float32 weights
    model = make_mlp_onnx(3, sizes=sizes)
    bundle = write_bundle(mlp_manifest(model, version="3.0.0", sizes=sizes), model, tmp_path / "big.efb")
    assert bundle.stat().st_size > 24 * 1024 * 1024 > api.settings.limits.max_body_bytes
    ensure_trust(api.settings)
    h = api.h(**{"Content-Type": "application/octet-stream"})
    with bundle.open("rb") as fh:
        res = api.client.post("/v1/models/mlp/versions/upload", content=fh.read(), headers=h)
    assert res.status_code == 201, res.text
    assert res.json()["bundle_target"] == "models/mlp/mlp-3.0.0.efb"
