"""The fleet's side of offline updates: the exported file, and how an offline install is recorded."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from agent.contract.offline import read_offline
from agent.contract.protocol import Event
from fleet.delivery.offline_export import export_offline
from fleet.errors import FleetInputError
from fleet.rollouts.device_verdicts import event_update, forward_update
from fleet.rollouts.record_types import DeviceProgress, DeviceReport, OpenEntry, RuntimePhase
from fleet.rollouts.strategies import StrategyConfig
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from tests.support.lifecycle_world import Repo, make_repo


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = make_repo(tmp_path / "fleet")
    r.publish("1.0.0", model_seed=0)
    return r


def test_export_carries_the_chain_the_bundle_and_one_document_per_device(repo: Repo, tmp_path: Path) -> None:
    signer = DirectorSigner(KeyStore(repo.root / "keys"), repo.root / "director")
    try:
        ref = repo.repo.target_ref(repo.refs["mlp-1.0.0"].path)
        result = export_offline(repo.repo, signer, ref, tmp_path / "u.efo", ["d1", "d2"], cohort="lab")
        with pytest.raises(FleetInputError, match="at least one device"):
            export_offline(repo.repo, signer, ref, tmp_path / "none.efo", [])
        assert signer.last_sequence(device_id="d1") == 1  # the online counter: never reused
    finally:
        signer.close()
    assert result.addressees == [f"director/{a}.json" for a in ("cohort-lab", "device-d1", "device-d2")]
    with tarfile.open(result.path) as tar:
        names = tar.getnames()
    assert "metadata/1.root.json" in names and "metadata/timestamp.json" in names
    assert f"targets/models/mlp/{ref.sha256}.mlp-1.0.0.efb" in names
    pkg = read_offline(result.path, tmp_path / "work")
    try:
        assert pkg.target == ref.path and set(pkg.directors) == {"device:d1", "device:d2", "cohort:lab"}
        assert json.loads(pkg.directors["device:d1"])["signed"]["target"]["sha256"] == ref.sha256
    finally:
        pkg.cleanup()
    assert not list((tmp_path / "work").iterdir())


def _row() -> DeviceProgress:
    return DeviceProgress(rollout_id="r1", device_id="d1", ordinal="0", from_bundle="mlp-0.9.0",
                          assigned_at=100.0, acked=False, outcome=None, revert_at=None, detail="",
                          status="assigned", stage=0)


def test_an_offline_install_is_recorded_as_such() -> None:
    cfg = StrategyConfig.parse({"kind": "all_at_once"})
    report = DeviceReport(state="idle", active_bundle="mlp-1.0.0", timestamp=200.0, online=True,
                          install_origin="offline_install")
    update = forward_update(_row(), report, "mlp-1.0.0", 200.0, cfg, 5.0)
    assert update is not None and update.fields["outcome"] == "succeeded"
    assert update.fields["detail"] == "committed (offline install)"
    online = forward_update(_row(), DeviceReport(state="idle", active_bundle="mlp-1.0.0", timestamp=200.0),
                            "mlp-1.0.0", 200.0, cfg, 5.0)
    assert online is not None and online.fields["detail"] == "committed"
    entry = OpenEntry(rollout_id="r1", device_id="d1", from_bundle="mlp-0.9.0", assigned_at=100.0,
                      acked=False, outcome=None, phase=RuntimePhase.FORWARD, target_bundle="mlp-1.0.0")
    ev = Event(type="offline_install", bundle_id="mlp-1.0.0", timestamp=200.0, seq=1)
    got = event_update(entry, ev, 5.0)
    assert got is not None and got.status == "succeeded" and "offline install" in got.fields["detail"]
