"""TUF attacks against the agent's `TrustClient`, each refused with trusted state untouched.

A real repository (`fleet.trust.repository.Repository`, real keys on disk) is served from its
directory by `DirectoryFetcher`; the attacker edits the served files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, Root

from agent.contract.director import DirectorTrust, TargetRef
from agent.errors import DirectorError, NotFoundError, TrustError
from agent.trust import DirectoryFetcher, TrustClient
from fleet.trust.keys import KeyStore
from fleet.trust.repository import ExpiryPolicy, Repository

TARGET = "models/m/m-1.0.0.efb"
PAYLOAD = b"bundle-bytes-" * 500


@dataclass
class World:
    repo: Repository
    store: KeyStore
    fetcher: DirectoryFetcher
    client: TrustClient
    ref: TargetRef

    def snapshot(self) -> dict[str, bytes]:
        """Every trusted file (symlinks followed) and downloaded target."""
        out = {}
        for base in (self.client.metadata_dir, self.client.target_dir):
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    out[str(p.relative_to(base.parent))] = p.read_bytes()
        return out

    def assert_only_moved(self, before: dict[str, bytes], *valid: str) -> None:
        """Only the named roles changed: valid newer metadata above the attacked role is kept
        (TUF persists each role once it verifies, before checking what it points at)."""
        after = self.snapshot()
        assert after.keys() == before.keys()
        assert {k: v for k, v in after.items() if not any(r in k for r in valid)} == {
            k: v for k, v in before.items() if not any(r in k for r in valid)
        }

    def served(self, name: str) -> Path:
        return self.repo.metadata_dir / name

    def served_target(self) -> Path:
        return self.repo.targets_dir / "models/m" / f"{self.ref.sha256}.m-1.0.0.efb"


def _client(tmp_path: Path, repo: Repository, fetcher: DirectoryFetcher, **kw: object) -> TrustClient:
    return TrustClient(
        tmp_path / "device/metadata",
        tmp_path / "device/targets",
        fetcher,
        fetcher.url_for("metadata"),
        fetcher.url_for("targets"),
        bootstrap_root=(repo.metadata_dir / "1.root.json").read_bytes(),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def world(tmp_path: Path) -> World:
    store = KeyStore(tmp_path / "keys")
    repo = Repository(tmp_path / "repo", store)
    repo.init(root_threshold=2, root_keys=3)
    bundle = tmp_path / "m.efb"
    bundle.write_bytes(PAYLOAD)
    ref = repo.add_target(bundle, TARGET, {"name": "m", "version": "1.0.0"})
    fetcher = DirectoryFetcher(repo.repo_dir)
    client = _client(tmp_path, repo, fetcher)
    client.refresh()
    return World(repo, store, fetcher, client, ref)


def _resign(path: Path, signers: Sequence[Signer], edit: Callable[[Metadata[Any]], None]) -> None:
    md = Metadata.from_file(str(path))
    edit(md)
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    md.to_file(str(path))


@pytest.mark.integration
def test_happy_path_download_and_cache(world: World) -> None:
    path = world.client.download_target(TARGET, expected=world.ref)
    assert path.read_bytes() == PAYLOAD
    assert world.ref.name == "m" and world.ref.length == len(PAYLOAD)
    before = len(world.fetcher.requested)
    assert world.client.download_target(TARGET, expected=world.ref) == path
    assert not any("/targets/" in u for u in world.fetcher.requested[before:]), "cached target fetched again"
    assert world.client.trusted_root().version == 1
    assert set(world.client.director_trust().keys) == {k.keyid for k in world.store.role("director").keys}


@pytest.mark.integration
def test_tampered_target_bytes_refused(world: World) -> None:
    before = world.snapshot()
    world.served_target().write_bytes(PAYLOAD.replace(b"bundle", b"evil!!"))
    with pytest.raises(TrustError, match="LengthOrHashMismatchError"):
        world.client.download_target(TARGET)
    assert world.snapshot() == before


@pytest.mark.integration
def test_endless_target_data_refused(world: World) -> None:
    before = world.snapshot()
    world.served_target().write_bytes(PAYLOAD + b"\0" * 1_000_000)
    with pytest.raises(TrustError, match="more data than signed"):
        world.client.download_target(TARGET)
    assert world.snapshot() == before


@pytest.mark.integration
def test_modified_metadata_refused(world: World) -> None:
    before = world.snapshot()
    world.repo.add_target(world.served_target(), "models/m/m-1.0.1.efb")
    served = world.served("3.targets.json")
    doc = json.loads(served.read_bytes())
    doc["signed"]["targets"]["models/m/m-1.0.1.efb"]["length"] += 1  # edit without re-signing
    served.write_text(json.dumps(doc))
    with pytest.raises(TrustError, match="UnsignedMetadataError"):
        world.client.refresh()
    world.assert_only_moved(before, "timestamp", "snapshot")


@pytest.mark.integration
def test_signature_by_unknown_key_refused(world: World) -> None:
    before = world.snapshot()
    _resign(world.served("timestamp.json"), [CryptoSigner.generate_ed25519()], lambda md: None)
    with pytest.raises(TrustError, match="UnsignedMetadataError"):
        world.client.refresh()
    assert world.snapshot() == before


@pytest.mark.integration
def test_fewer_signatures_than_threshold_refused(world: World) -> None:
    before = world.snapshot()
    world.repo.refresh_timestamp()
    ts = world.served("timestamp.json")
    doc = json.loads(ts.read_bytes())
    doc["signatures"] = []
    ts.write_text(json.dumps(doc))
    with pytest.raises(TrustError, match="UnsignedMetadataError"):
        world.client.refresh()
    assert world.snapshot() == before


@pytest.mark.integration
def test_expired_timestamp_freeze_refused(world: World) -> None:
    before = world.snapshot()
    later = datetime.now(UTC) + timedelta(days=2)  # the repository stopped refreshing the timestamp
    frozen = _client(world.client.metadata_dir.parents[1], world.repo, world.fetcher, clock=lambda: later)
    with pytest.raises(TrustError, match=r"ExpiredMetadataError.*timestamp"):
        frozen.refresh()
    assert world.snapshot() == before


@pytest.mark.integration
def test_repository_signing_already_expired_metadata_refused(tmp_path: Path) -> None:
    past = datetime.now(UTC) - timedelta(days=3)
    repo = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"), ExpiryPolicy(), clock=lambda: past)
    repo.init(root_threshold=1, root_keys=1)
    fetcher = DirectoryFetcher(repo.repo_dir)
    with pytest.raises(TrustError, match="ExpiredMetadataError"):
        _client(tmp_path, repo, fetcher).refresh()
    assert not (tmp_path / "device/metadata/timestamp.json").exists()


@pytest.mark.integration
def test_timestamp_rollback_refused(world: World) -> None:
    old_timestamp = world.served("timestamp.json").read_bytes()
    world.repo.add_target(world.served_target(), "models/m/m-1.0.1.efb")
    world.client.refresh()
    before = world.snapshot()
    world.served("timestamp.json").write_bytes(old_timestamp)  # replay a valid, older timestamp
    with pytest.raises(TrustError, match="BadVersionNumberError"):
        world.client.refresh()
    assert world.snapshot() == before


@pytest.mark.integration
def test_snapshot_rollback_refused(world: World) -> None:
    world.repo.add_target(world.served_target(), "models/m/m-1.0.1.efb")
    world.client.refresh()
    before = world.snapshot()
    # a validly signed new timestamp that points back at an older snapshot version
    current = world.repo.load("timestamp").signed
    world.repo._write_timestamp(current.version + 1, current.snapshot_meta.version - 1)
    with pytest.raises(TrustError, match=r"BadVersionNumberError.*snapshot"):
        world.client.refresh()
    assert world.snapshot() == before


@pytest.mark.integration
def test_targets_rollback_refused(world: World) -> None:
    world.repo.add_target(world.served_target(), "models/m/m-1.0.1.efb")
    world.client.refresh()
    before = world.snapshot()
    # a validly signed new snapshot (and timestamp) that lists an older targets version
    forged = world.served("4.snapshot.json")
    forged.write_bytes(world.served("3.snapshot.json").read_bytes())

    def older_targets(md: Metadata[Any]) -> None:
        md.signed.version = 4
        md.signed.meta["targets.json"].version = 2

    _resign(forged, world.store.signers("snapshot"), older_targets)
    world.repo._write_timestamp(world.repo.load("timestamp").signed.version + 1, 4)
    with pytest.raises(TrustError, match=r"BadVersionNumberError.*targets"):
        world.client.refresh()
    world.assert_only_moved(before, "timestamp")


@pytest.mark.integration
def test_mix_and_match_refused(world: World) -> None:
    before = world.snapshot()
    world.repo.add_target(world.served_target(), "models/m/m-1.0.1.efb")
    # serve the older (validly signed) snapshot under the name the new timestamp points at
    world.served("3.snapshot.json").write_bytes(world.served("2.snapshot.json").read_bytes())
    with pytest.raises(TrustError, match="BadVersionNumberError: Expected snapshot version 3, got 2"):
        world.client.refresh()
    world.assert_only_moved(before, "timestamp")


@pytest.mark.integration
def test_director_reference_must_match_tuf(world: World) -> None:
    before = world.snapshot()
    wrong = world.ref.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(TrustError, match="does not match the TUF-signed target"):
        world.client.download_target(TARGET, expected=wrong)
    with pytest.raises(TrustError, match="not listed in the signed targets metadata"):
        world.client.download_target("models/m/unknown.efb")
    assert world.snapshot() == before


@pytest.mark.integration
def test_missing_target_file_is_not_found(world: World) -> None:
    world.served_target().unlink()
    with pytest.raises(NotFoundError, match="404"):
        world.client.download_target(TARGET)


@pytest.mark.integration
def test_root_rotation_followed(world: World) -> None:
    world.store.rotate("root", count=3, threshold=2)
    world.store.rotate("director")
    world.store.rotate("timestamp")
    assert world.repo.rotate_root() == 2
    world.client.refresh()
    root = world.client.trusted_root()
    assert root.version == 2
    assert set(root.roles["root"].keyids) == {k.keyid for k in world.store.role("root").keys}
    assert set(world.client.director_trust().keys) == {k.keyid for k in world.store.role("director").keys}
    assert world.client.download_target(TARGET).read_bytes() == PAYLOAD


@pytest.mark.integration
def test_root_rotation_below_threshold_refused(world: World) -> None:
    before = world.snapshot()
    old_root_keys = world.store.signers("root")
    new_key = CryptoSigner.generate_ed25519()

    def edit(md: Metadata[Any]) -> None:
        root: Root = md.signed
        root.version = 2  # would smuggle in an attacker's director key:
        root.unrecognized_fields["x-edgefleet-director"] = DirectorTrust(
            keys={new_key.public_key.keyid: new_key.public_key}, threshold=1
        ).to_dict()

    rotated = world.served("2.root.json")
    rotated.write_bytes(world.served("1.root.json").read_bytes())
    _resign(rotated, old_root_keys[:1], edit)  # 1 signature; the threshold is 2
    with pytest.raises(TrustError, match=r"UnsignedMetadataError.*root"):
        world.client.refresh()
    assert world.snapshot() == before
    assert world.client.trusted_root().version == 1
    assert new_key.public_key.keyid not in world.client.director_trust().keys


@pytest.mark.integration
def test_root_without_director_anchor(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    repo = Repository(tmp_path / "repo", store)
    repo.init(root_threshold=1, root_keys=1)
    _resign(
        repo.metadata_dir / "1.root.json",
        store.signers("root"),
        lambda md: md.signed.unrecognized_fields.clear(),
    )
    client = _client(tmp_path, repo, DirectoryFetcher(repo.repo_dir))
    with pytest.raises(DirectorError, match="no 'x-edgefleet-director' field"):
        client.director_trust()
