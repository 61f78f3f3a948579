"""No plaintext API key or enrollment token is ever persisted, replay records included."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.settings import FleetSettings
from fleet.store import Store


@dataclass
class Api:
    client: TestClient
    store: Store
    settings: FleetSettings
    admin: str

    def h(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}", **extra}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    settings = FleetSettings(data_dir=tmp_path)
    store = Store(settings.db_path)
    admin = create_api_key(store, "admin", "admin", "test")[1]
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield Api(client, store, settings, admin)
    store.close()


def _on_disk(settings: FleetSettings) -> bytes:
    """Every byte of the fleet database and its WAL as they are now."""
    return b"".join(p.read_bytes() for p in settings.data_dir.glob("fleet.db*") if p.is_file())


@pytest.mark.integration
def test_idempotent_creates_never_store_the_secret_and_replays_say_so(api: Api) -> None:
    created = {}
    for route, body, field in (("/v1/api-keys", {"name": "ci", "role": "viewer"}, "key"),
                               ("/v1/enrollment-tokens", {"labels": {"env": "prod"}}, "token")):
        h = api.h(**{"Idempotency-Key": f"once-{field}"})
        first = api.client.post(route, json=body, headers=h)
        assert first.status_code == 201, first.text
        secret = first.json()[field]
        assert secret.startswith(("efk_", "eft_")) and first.json().get("secret_note") is None
        again = api.client.post(route, json=body, headers=h)
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        replay = again.json()
        assert replay[field] is None and "shown once" in replay["secret_note"]
        assert {k: v for k, v in replay.items() if k not in (field, "secret_note")} == \
            {k: v for k, v in first.json().items() if k not in (field, "secret_note")}
        created[field] = secret
    with api.store.read() as db:
        stored = [r["response"] for r in db.query("SELECT response FROM idempotency_keys")]
    assert len(stored) == 2
    for secret in created.values():
        assert all(secret not in text for text in stored)
        assert secret.encode() not in _on_disk(api.settings)
    assert len(api.client.get("/v1/enrollment-tokens", headers=api.h()).json()["items"]) == 1


@pytest.mark.integration
def test_secrets_an_older_version_stored_are_scrubbed_at_start(api: Api) -> None:
    leaked = create_api_key(api.store, "old", "viewer", "test")
    record = {**leaked[0].to_dict(), "key": leaked[1]}  # what the previous version saved
    api.store.idempotency.save("key:x:admin", "old-1", "POST /v1/api-keys", "h", 201, record)
    assert leaked[1].encode() in _on_disk(api.settings)
    with TestClient(create_app(api.settings, api.store)):  # a restart runs the start-up scrub
        pass
    row = api.store.idempotency.get("key:x:admin", "old-1")
    assert row is not None and "key" not in row.response and row.response["id"] == leaked[0].id
    assert leaked[1].encode() not in _on_disk(api.settings)
