"""Key store: file permissions, signers through URIs, external (KMS-style) keys, misuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from agent.trust import DirectoryFetcher, TrustClient
from fleet.errors import FleetInputError, FleetMisuseError, SigningKeyError
from fleet.trust.keys import ROLES, KeyStore
from fleet.trust.repository import Repository


@pytest.mark.integration
def test_init_writes_private_keys_0600_and_public_json(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k")
    store.init(root_keys=3, root_threshold=2)
    pems = sorted((tmp_path / "k/private").rglob("*.pem"))
    assert len(pems) == 3 + len(ROLES) - 1
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in pems)
    assert (tmp_path / "k/private/root").stat().st_mode & 0o777 == 0o700
    public = (tmp_path / "k/keys.json").read_text()
    assert "PRIVATE" not in public and "file2:" in public
    assert store.role("root").threshold == 2
    payload = b"data"
    for signer in store.signers("root"):
        signer.public_key.verify_signature(signer.sign(payload), payload)


@pytest.mark.integration
def test_misuse_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FleetMisuseError, match="keys init"):
        KeyStore(tmp_path / "none").roles()
    store = KeyStore(tmp_path / "k")
    with pytest.raises(FleetMisuseError, match=r"threshold 4 must be within 1\.\.3"):
        store.init(root_keys=3, root_threshold=4)
    store.init(root_keys=1, root_threshold=1)
    with pytest.raises(FleetMisuseError, match="already exists"):
        store.init()
    with pytest.raises(FleetMisuseError, match="unknown role"):
        store.rotate("nobody")
    (next((tmp_path / "k/private/director").iterdir())).unlink()
    with pytest.raises(SigningKeyError, match="cannot load signer") as info:
        store.signers("director")
    assert "BEGIN" not in str(info.value)
    repo = Repository(tmp_path / "r", store)
    with pytest.raises(FleetMisuseError, match="not initialised"):
        repo.status()
    repo.init()
    with pytest.raises(FleetInputError, match="bad target path"):
        repo.add_target(tmp_path / "k/keys.json", "../escape")
    with pytest.raises(FleetInputError, match="no such file"):
        repo.add_target(tmp_path / "missing", "a/b")


@pytest.mark.integration
def test_external_signer_uri_joins_root(tmp_path: Path) -> None:
    """A key reached only through its URI (here file2:, as a KMS URI would be) signs root."""
    store = KeyStore(tmp_path / "k")
    repo = Repository(tmp_path / "r", store)
    repo.init(root_threshold=1, root_keys=1)
    external = CryptoSigner.generate_ed25519()
    pem = tmp_path / "elsewhere.pem"
    pem.write_bytes(external.private_bytes)
    store.add_external("root", f"file2:{pem}", external.public_key)
    assert repo.rotate_root() == 2
    root = json.loads((repo.metadata_dir / "2.root.json").read_bytes())
    assert external.public_key.keyid in root["signed"]["roles"]["root"]["keyids"]
    assert external.public_key.keyid in {s["keyid"] for s in root["signatures"]}
    fetcher = DirectoryFetcher(repo.repo_dir)
    client = TrustClient(
        tmp_path / "d/md",
        tmp_path / "d/t",
        fetcher,
        fetcher.url_for("metadata"),
        fetcher.url_for("targets"),
        bootstrap_root=(repo.metadata_dir / "1.root.json").read_bytes(),
    )
    client.refresh()
    assert client.trusted_root().version == 2
