"""A bounded Schemathesis run over the whole OpenAPI document, as admin: no 5xx, and every
answer is what the document declares (status, content type, body schema).

Bounded so it runs in CI: a few positive and a few negative examples per operation,
derandomized (the same cases every run). API key revocation is left out: generated revocations
would revoke the keys the run itself uses (the last admin key is protected, the others not).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.settings import FleetSettings
from fleet.store import Store
from tests.support.fakes import DIGEST

EXAMPLES = {GenerationMode.POSITIVE: 5, GenerationMode.NEGATIVE: 3}
EXCLUDED = r"^/v1/api-keys/\{key_id\}/revoke$"
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@dataclass
class Api:
    client: TestClient
    admin: dict[str, str]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    settings = FleetSettings(data_dir=tmp_path)
    settings.import_dir.mkdir(parents=True)
    store = Store(settings.db_path)
    admin = {"Authorization": f"Bearer {create_api_key(store, 'admin', 'admin', 'test')[1]}"}
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        _seed(client, admin)
        yield Api(client, admin)
    store.close()


def _seed(client: TestClient, h: dict[str, str]) -> None:
    """One of the main resources, so generated requests meet existing rows as well as absent ones."""
    assert client.post("/v1/models", json={"name": "m"}, headers=h).status_code == 201
    version = {"version": "1.0.0", "artifact_digest": DIGEST, "runtime": "onnx"}
    assert client.post("/v1/models/m/versions", json=version, headers=h).status_code == 201
    token = client.post("/v1/enrollment-tokens", json={"labels": {"env": "prod"}}, headers=h).json()["token"]
    assert client.post("/v1/enroll", json={}, headers={"Authorization": f"Bearer {token}"}).status_code == 201
    rollout = {"model_version_id": "m:1.0.0", "selector": "env=prod"}
    assert client.post("/v1/rollouts", json=rollout, headers=h).status_code == 201


@pytest.mark.integration
def test_schemathesis_finds_no_server_error_and_no_schema_violation(api: Api) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app).exclude(path_regex=EXCLUDED)
    failures: list[str] = []
    statuses: list[tuple[GenerationMode, str, int]] = []

    def run(operation: Any, mode: GenerationMode) -> None:
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call(headers=dict(api.admin))  # call() adds to the dict it gets
            statuses.append((mode, case.operation.path, response.status_code))
            try:
                case.validate_response(response, checks=CHECKS, headers=dict(api.admin))
            except (AssertionError, BaseExceptionGroup) as exc:  # Schemathesis' FailureGroup; collect all
                failures.append(f"{mode.value} {case.method} {case.formatted_path} -> "
                                f"{response.status_code}: {str(exc)[:600]}")

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
            if mode is not GenerationMode.NEGATIVE:
                raise

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in EXAMPLES:
            run(operation, mode)
    assert failures == [], "\n".join(failures[:20])
    paths = {path for _, path, _ in statuses}
    assert len(paths) >= 25 and not any("/revoke" in p and "api-keys" in p for p in paths)
    assert not [s for s in statuses if s[2] >= 500]
    # Valid requests are authenticated everywhere; only /v1/enroll refuses the admin key (it wants
    # an enrollment token). Negative cases may also break the Authorization header itself.
    positive = [(path, code) for mode, path, code in statuses if mode is GenerationMode.POSITIVE]
    assert {path for path, code in positive if code == 401} <= {"/v1/enroll"}
    assert sum(200 <= code < 300 for _, _, code in statuses) >= 10
