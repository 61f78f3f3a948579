"""Offline update files: exported by the fleet, imported by the agent with no broker at all.

The device's config points at a broker port nobody listens on. A valid file installs through
the same TUF client, director gate and lifecycle; every attack is refused with its own error
and leaves the state record, the slots and the director ledger exactly as they were.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import subprocess
import sys
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon.core import AgentDaemon
from agent.errors import DirectorError, OfflineImportError, TrustError
from fleet.delivery.offline_export import export_offline
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from tests.support.broker import free_port
from tests.support.lifecycle_world import Repo, make_repo

DEVICE = "usb-dev-1"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    r = make_repo(tmp_path_factory.mktemp("fleet"))
    r.publish("1.0.0", model_seed=0)
    return r


def _export(repo: Repo, out: Path, devices: list[str] | None = None) -> Path:
    signer = DirectorSigner(KeyStore(repo.root / "keys"), repo.root / "director")
    try:
        ref = repo.repo.target_ref(repo.refs["mlp-1.0.0"].path)
        return export_offline(repo.repo, signer, ref, out, devices or [DEVICE]).path
    finally:
        signer.close()


def _config(repo: Repo, tmp: Path, **extra: object) -> Path:
    state = tmp / "device"
    root = repo.repo.metadata_dir / "1.root.json"
    cfg = {"device_id": DEVICE, "state_dir": str(state), "bootstrap_root": str(root),
           "mqtt": {"port": free_port()}, "api": {"http_enabled": False, "unix_enabled": False}, **extra}
    path = tmp / "agent.json"
    path.write_text(json.dumps(cfg))
    return path


def _snapshot(state: Path) -> dict[str, str]:
    """Every file of the device's record, slots and ledger (TUF metadata may rightly move on)."""
    out = {}
    for p in sorted(state.rglob("*")):
        rel = str(p.relative_to(state))
        if p.is_file() and not rel.startswith(("tuf/", "events.sqlite", "telemetry.sqlite", "agent.lock")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _events(state: Path) -> list[dict[str, object]]:
    db = sqlite3.connect(state / "events.sqlite")
    try:
        return [json.loads(row[0]) for row in db.execute("SELECT payload FROM events ORDER BY id")]
    finally:
        db.close()


@pytest.mark.integration
def test_valid_offline_file_installs_with_no_broker(repo: Repo, tmp_path: Path) -> None:
    efo = _export(repo, tmp_path / "update.efo")
    cfg = _config(repo, tmp_path)
    cmd = [sys.executable, "-m", "agent.cli", "agent", "import", str(efo), "--config", str(cfg)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "installed mlp-1.0.0" in done.stdout
    daemon = AgentDaemon(load_config(cfg))
    try:
        assert daemon.lifecycle.record.active == "mlp-1.0.0" and daemon.lifecycle.record.state == "idle"
        reported = daemon.reported_state()
        assert reported.install_origin == "offline_install" and "delta" in reported.features
    finally:
        daemon.outbox.close()
        daemon.queue.close()
    kinds = [e["type"] for e in _events(tmp_path / "device")]
    assert "committed" in kinds and kinds[-1] == "offline_install"  # waiting for the reconnect
    # the same file again: its director document was already applied
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already applied" in again.stderr


def _refused(repo: Repo, tmp_path: Path, efo: Path, error: type[Exception], match: str,
             skew: timedelta | None = None) -> None:
    cfg = _config(repo, tmp_path)
    daemon = AgentDaemon(load_config(cfg))
    state = tmp_path / "device"
    daemon.lifecycle.start()  # a provisioned device: its record exists before the file arrives
    before = _snapshot(state)
    assert before
    if skew is not None:
        daemon.gate.clock = lambda: datetime.now(UTC) + skew
    with pytest.raises(error, match=match):
        daemon.import_offline(efo)
    assert _snapshot(state) == before
    assert not list((state / "lifecycle" / "bundles").glob("mlp-*"))
    assert [e["type"] for e in _events(state)][-1] == "offline_refused"


@pytest.mark.integration
def test_expired_metadata_refused(repo: Repo, tmp_path: Path) -> None:
    efo = _export(repo, tmp_path / "update.efo")
    _refused(repo, tmp_path, efo, TrustError, "ExpiredMetadataError", skew=timedelta(days=3))


@pytest.mark.integration
def test_foreign_metadata_refused(repo: Repo, tmp_path: Path) -> None:
    stranger = make_repo(tmp_path / "stranger")  # another fleet's keys, the same bundle
    stranger.publish("1.0.0", model_seed=0)
    efo = _export(stranger, tmp_path / "foreign.efo")
    _refused(repo, tmp_path, efo, TrustError, "UnsignedMetadataError: timestamp was signed by 0/1 keys")


@pytest.mark.integration
def test_director_document_for_another_device_refused(repo: Repo, tmp_path: Path) -> None:
    efo = _export(repo, tmp_path / "other.efo", devices=["someone-else"])
    _refused(repo, tmp_path, efo, DirectorError, "addressed to device 'someone-else'")


@pytest.mark.integration
def test_truncated_file_refused(repo: Repo, tmp_path: Path) -> None:
    efo = _export(repo, tmp_path / "update.efo")
    short = tmp_path / "short.efo"
    short.write_bytes(efo.read_bytes()[: efo.stat().st_size * 2 // 3])
    _refused(repo, tmp_path, short, OfflineImportError, "truncated")


@pytest.mark.integration
def test_path_traversal_member_refused(repo: Repo, tmp_path: Path) -> None:
    efo = _export(repo, tmp_path / "update.efo")
    evil = tmp_path / "evil.efo"
    with tarfile.open(efo) as src, tarfile.open(evil, "w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src.getmembers():
            dst.addfile(info, src.extractfile(info))
        payload = b"pwned"
        bad = tarfile.TarInfo("../../escaped.txt")
        bad.size = len(payload)
        dst.addfile(bad, io.BytesIO(payload))
    _refused(repo, tmp_path, evil, OfflineImportError, "outside the layout")
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.integration
def test_drop_directory_imports_and_files_the_result(repo: Repo, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    _export(repo, drop / "a.efo")
    (drop / "b.efo").write_bytes(b"not an archive")
    daemon = AgentDaemon(load_config(_config(repo, tmp_path, offline_drop_dir=str(drop))))
    try:
        daemon.lifecycle.start()
        daemon.offline.poll_drop_dir()
        assert daemon.lifecycle.record.active == "mlp-1.0.0"
        assert (drop / "processed" / "a.efo").is_file() and (drop / "refused" / "b.efo").is_file()
        assert "archive" in (drop / "refused" / "b.efo.reason").read_text()
        assert not list(drop.glob("*.efo"))
    finally:
        daemon.outbox.close()
        daemon.queue.close()
