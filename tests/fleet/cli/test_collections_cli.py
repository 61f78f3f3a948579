"""`edgefleet collections` and `edgefleet datasets` against a running fleet API (no broker):
operators create and stop, viewers read and are refused creating, errors are one line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contract.bundle import write_bundle
from fleet.cli import collections, datasets, models
from fleet.cli.api_client import EXIT_AUTH, EXIT_INVALID, EXIT_NOT_FOUND
from simulators.models import make_mlp_onnx
from tests.support.cli_runner import as_json, cli
from tests.support.lifecycle_world import FAST, manifest_for
from tests.support.running_fleet import RunningFleet, running_fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[RunningFleet]:
    with running_fleet(tmp_path / "fleet") as f:
        yield f


@pytest.mark.integration
def test_collections_create_list_show_stop_and_datasets(fleet: RunningFleet, tmp_path: Path) -> None:
    env, viewer = fleet.env(), fleet.env("viewer")
    model = make_mlp_onnx(1, sizes=(32, 64, 64, 4))
    cli(models.group, "publish", str(write_bundle(manifest_for("1.0.0", model, 1, FAST), model,
                                                  tmp_path / "mlp-1.0.0.efb")), env=env)
    made = as_json(collections.group, "create", "--model", "mlp", "--version", "1.0.0", "--selector",
                   "site=lab", "--max-rows", "50", "--max-seconds", "60", "--only-while-drift", env=env)
    cid = made["collection_id"]
    assert made["status"] == "pending" and made["policy"]["max_rows"] == 50
    assert made["policy"]["only_while_drift"] is True and made["policy"]["policy_id"] == cid
    assert [c["collection_id"] for c in as_json(collections.group, "list", env=viewer)] == [cid]
    assert as_json(collections.group, "show", cid, env=viewer)["datasets"] == []
    assert cid in cli(collections.group, "list", env=viewer).stdout
    cli(collections.group, "create", "--model", "mlp", "--version", "1.0.0", env=viewer, code=EXIT_AUTH)
    cli(collections.group, "create", "--model", "mlp", "--version", "1.0.0", "--selector", "a in (",
        env=env, code=EXIT_INVALID)
    cli(collections.group, "create", "--model", "mlp", "--version", "7.0.0", env=env, code=EXIT_NOT_FOUND)
    cli(collections.group, "stop", cid, env=viewer, code=EXIT_AUTH)
    assert as_json(collections.group, "stop", cid, env=env)["status"] == "stopped"
    cli(collections.group, "show", "col-none", env=viewer, code=EXIT_NOT_FOUND)
    assert as_json(datasets.group, "list", "--collection", cid, env=viewer) == []
    cli(datasets.group, "show", "nope", env=viewer, code=EXIT_NOT_FOUND)
    out = str(tmp_path / "x.npz")
    err = cli(datasets.group, "export", "nope", "-o", out, env=viewer, code=EXIT_NOT_FOUND)
    assert "nope" in err.stderr and not (tmp_path / "x.npz").exists()
