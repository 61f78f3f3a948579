"""Publishing a bundle sealed for a cohort, and re-wrapping it, through the API on a real store.

Only ciphertext reaches the TUF repository (a known run of the model's bytes is nowhere in it);
the recipients document names exactly the cohort's devices with a wrap key (not revoked ones,
not other cohorts); a device enrolled later joins by a re-wrap that leaves the sealed target
byte-identical; each wrapped key opens for its own device's private key only. Audited.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi.testclient import TestClient

from agent.contract.bundle import write_bundle
from agent.contract.envelope import parse_wrapped_keys, public_key_raw, recipients_target, unwrap_content_key
from agent.errors import BundleNotForThisDeviceError
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.devices.wrap_keys import store_wrap_key
from fleet.registry.sealed_manifest import content_keys_dir, read_published_manifest
from fleet.rollouts.compatibility import interface_of
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from simulators.models import make_mlp_onnx
from tests.support.fakes import FakeClock
from tests.support.lifecycle_world import manifest_for


def _device(store: Store, device_id: str, site: str, key: X25519PrivateKey | None) -> None:
    store.devices.create(device_id, {"site": site}, {"agent_version": "0.1.0"}, device_id, "$7$x", "test")
    if key is not None:
        store_wrap_key(store, device_id, base64.b64encode(public_key_raw(key.public_key())).decode())


@pytest.mark.integration
def test_sealed_publish_and_rewrap(tmp_path: Path) -> None:
    settings = FleetSettings(data_dir=tmp_path / "data")
    store = Store(settings.database, clock=FakeClock())
    repo = Repository(settings.repo_dir, KeyStore(settings.keys_dir))
    repo.init(root_threshold=1, root_keys=1)
    keys = {d: X25519PrivateKey.generate() for d in ("dev-a", "dev-b", "dev-c", "dev-late")}
    _device(store, "dev-a", "lab", keys["dev-a"])
    _device(store, "dev-b", "lab", keys["dev-b"])
    _device(store, "dev-c", "field", keys["dev-c"])  # another cohort
    _device(store, "dev-nokey", "lab", None)  # enrolled before bundle encryption
    model = make_mlp_onnx(5)
    settings.import_dir.mkdir(parents=True)
    write_bundle(manifest_for("1.0.0", model, 5), model, settings.import_dir / "mlp-1.0.0.efb")
    operator = create_api_key(store, "op", "operator", "test")[1]
    viewer = create_api_key(store, "v", "viewer", "test")[1]
    auth = {"Authorization": f"Bearer {operator}"}
    with TestClient(create_app(settings, store)) as client:
        body = {"path": "mlp-1.0.0.efb", "selector": "site=lab", "chunk_bytes": 4096}
        denied = client.post("/v1/models/mlp/versions/from-bundle/sealed", json=body,
                             headers={"Authorization": f"Bearer {viewer}"})
        assert denied.status_code == 403
        res = client.post("/v1/models/mlp/versions/from-bundle/sealed", json=body, headers=auth)
        assert res.status_code == 201, res.text
        out = res.json()
        assert out["wrap"]["devices"] == ["dev-a", "dev-b"] and out["wrap"]["without_key"] == ["dev-nokey"]
        target = out["version"]["bundle_target"]
        sha = out["wrap"]["bundle_sha256"]
        ref = repo.target_ref(target)
        assert ref.sha256 == sha and out["version"]["lineage"]["source"]["bundle_sha256"] == sha

        # the plaintext is nowhere in the published repository
        needle = model[2048:2112]
        files = [p for p in settings.repo_dir.rglob("*") if p.is_file()]
        assert files and not [p for p in files if needle in p.read_bytes()]
        assert not [p for p in content_keys_dir(settings.data_dir).iterdir() if p.stat().st_mode & 0o077]
        again = client.post("/v1/models/mlp/versions/from-bundle/sealed", json=body, headers=auth)
        assert again.status_code == 409  # the version exists; no orphan content key is left
        assert len(list(content_keys_dir(settings.data_dir).iterdir())) == 1

        def recipients() -> bytes:
            info = repo.load("targets").signed.targets[recipients_target(sha)]
            name = f"{info.hashes['sha256']}.{sha}.json"
            return (settings.repo_dir / "targets" / "recipients" / name).read_bytes()

        # the fleet's own readers (drift profile, compatibility) still see the manifest
        stored = settings.repo_dir / "targets" / "models" / "mlp" / f"{sha}.mlp-1.0.0.efb"
        assert read_published_manifest(settings.repo_dir, stored) == manifest_for("1.0.0", model, 5)
        assert interface_of(repo, ref).inputs == ("x:float32[?,32]",)

        doc = parse_wrapped_keys(recipients(), sha)
        key_a = unwrap_content_key(doc, keys["dev-a"], "dev-a")
        assert unwrap_content_key(doc, keys["dev-b"], "dev-b") == key_a
        with pytest.raises(BundleNotForThisDeviceError):
            unwrap_content_key(doc, keys["dev-c"], "dev-c")

        # a device enrolled later joins, a revoked one leaves: only the recipients change
        sealed_before = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(
            (settings.repo_dir / "targets" / "models").rglob("*")) if p.is_file())).hexdigest()
        _device(store, "dev-late", "lab", keys["dev-late"])
        store.devices.revoke("dev-b", "test")
        res = client.post("/v1/models/mlp/versions/1.0.0/recipients", json={"selector": "site=lab"},
                          headers=auth)
        assert res.status_code == 200, res.text
        assert res.json()["devices"] == ["dev-a", "dev-late"]
        assert repo.target_ref(target) == ref
        assert sealed_before == hashlib.sha256(b"".join(p.read_bytes() for p in sorted(
            (settings.repo_dir / "targets" / "models").rglob("*")) if p.is_file())).hexdigest()
        doc = parse_wrapped_keys(recipients(), sha)
        assert unwrap_content_key(doc, keys["dev-late"], "dev-late") == key_a
        with pytest.raises(BundleNotForThisDeviceError):
            unwrap_content_key(doc, keys["dev-b"], "dev-b")

        # bad input: a cohort nobody can open, a version that was not sealed
        empty = client.post("/v1/models/mlp/versions/1.0.0/recipients", json={"selector": "site=moon"},
                            headers=auth)
        assert empty.status_code == 422 and "has a wrap key" in empty.text
        write_bundle(manifest_for("2.0.0", model, 5), model, settings.import_dir / "mlp-2.0.0.efb")
        plain = client.post("/v1/models/mlp/versions/from-bundle", json={"path": "mlp-2.0.0.efb"},
                            headers=auth)
        assert plain.status_code == 201, plain.text
        unsealed = client.post("/v1/models/mlp/versions/2.0.0/recipients", json={"selector": "site=lab"},
                               headers=auth)
        assert unsealed.status_code == 422 and "not a bundle this fleet sealed" in unsealed.text
        audit = client.get("/v1/audit", headers=auth).json()
    actions = [e["action"] for e in audit["items"]]
    assert actions.count("bundle.wrap") == 2
    store.close()
