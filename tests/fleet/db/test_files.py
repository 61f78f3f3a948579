"""The data directory is 0700 and every database (with its WAL and shared-memory files) 0600,
whatever the umask the service was started with (`fleet/db/files.py` and its call sites)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fleet.access.auth import create_api_key
from fleet.db.files import is_private, secure_dir, secure_file
from fleet.errors import FleetMisuseError
from fleet.service import FleetService
from fleet.settings import FleetSettings
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual interactive umask: without explicit modes, new files would be 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.integration
@pytest.mark.usefixtures("umask_022")
def test_service_state_is_private_whatever_the_umask(tmp_path: Path) -> None:
    data = tmp_path / "state" / "fleet-data"
    settings = FleetSettings(data_dir=data)
    service = FleetService(settings)
    try:
        key = create_api_key(service.store, "v", "viewer", "test")[1]
        with TestClient(service.app) as client:  # the telemetry routes open telemetry.db and alerts.db
            res = client.get("/v1/telemetry/windows", headers={"Authorization": f"Bearer {key}"})
            assert res.status_code == 200, res.text
            signer = DirectorSigner(KeyStore(settings.keys_dir), data / "director")
            # Checked while everything is open: SQLite removes the -wal/-shm files at the last close.
            files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
            modes = {name: oct(_mode(data / name)) for name in files}
            signer.close()
    finally:
        service.store.close()
        ctx = getattr(service.app.state, "telemetry_context", None)
        if ctx is not None:
            ctx.telemetry.close()
            ctx.alerts.close()
    assert _mode(data) == 0o700 and _mode(data.parent) == 0o700  # a missing parent is made 0700 too
    for db in ("fleet.db", "telemetry.db", "alerts.db", "director/director.sqlite"):
        for name in (db, db + "-wal", db + "-shm"):  # WAL mode: SQLite made them beside each database
            assert modes.get(name) == "0o600", (name, modes)


@pytest.mark.integration
@pytest.mark.usefixtures("umask_022")
def test_a_looser_existing_data_dir_and_database_are_tightened_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    for name in ("fleet.db", "fleet.db-wal"):
        (data / name).touch()
        (data / name).chmod(0o644)
    caplog.set_level(logging.WARNING, logger="edgefleet.fleet.files")
    service = FleetService(FleetSettings(data_dir=data))
    service.store.close()
    assert _mode(data) == 0o700
    assert _mode(data / "fleet.db") == 0o600
    tightened = [r for r in caplog.records if r.getMessage() == "fleet.files.tightened"]
    assert {r.__dict__["path"] for r in tightened} >= {str(data), str(data / "fleet.db")}
    assert {r.__dict__["was"] for r in tightened} == {"0o755", "0o644"}


@pytest.mark.unit
@pytest.mark.usefixtures("umask_022")
def test_secure_helpers(tmp_path: Path) -> None:
    f = secure_file(tmp_path / "new" / "secret")
    assert f.read_bytes() == b"" and _mode(f) == 0o600 and _mode(f.parent) == 0o700 and is_private(f)
    f.write_bytes(b"kept")
    f.chmod(0o640)
    assert not is_private(f)
    assert secure_file(f).read_bytes() == b"kept" and _mode(f) == 0o600  # never truncated
    assert secure_file(":memory:") == Path(":memory:")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    secure_file(shared / "x.db")
    assert _mode(shared) == 0o755  # an existing parent may be shared: left alone
    assert _mode(secure_dir(tmp_path / "d")) == 0o700
    if os.geteuid() != 0:  # root may chmod anything
        with pytest.raises(FleetMisuseError, match="0600"):
            secure_file("/proc/version")
