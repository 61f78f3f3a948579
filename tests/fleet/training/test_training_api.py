"""Training jobs over the API and the CLI: roles, refusals, audit, and one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from agent.contract.bundle import write_bundle
from fleet.cli import models, training
from fleet.training.policy import TrainingPolicy, TrainingSettings
from simulators.models import make_mlp_onnx
from tests.support.lifecycle_world import FAST, manifest_for
from tests.support.running_fleet import RunningFleet, running_fleet

POLICY = TrainingPolicy.model_validate({
    "model": "mlp", "reference_data": "reference.npz", "collect_policy_id": "drift-b",
    "trainer": {"entry_point": "simulators.trainer:train", "env": {"MODEL_STORE_TOKEN": "s3cret"}}})


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[RunningFleet]:
    with running_fleet(tmp_path / "fleet", training=TrainingSettings(policies=(POLICY,))) as f:
        yield f


def cli(group: object, *args: str, env: dict[str, str], code: int = 0) -> Result:
    result = CliRunner().invoke(group, list(args), env=env)  # type: ignore[arg-type]
    assert "Traceback" not in result.output
    assert result.exit_code == code, (args, result.output)
    return result


@pytest.mark.integration
def test_start_list_show_cancel_and_the_refusals(fleet: RunningFleet, tmp_path: Path) -> None:
    model = make_mlp_onnx(1)
    path = write_bundle(manifest_for("1.0.0", model, 1, FAST), model, tmp_path / "mlp-1.0.0.efb")
    cli(models.group, "publish", str(path), env=fleet.env())
    env = fleet.env()
    job = json.loads(cli(training.group, "start", "mlp", "--parent", "1.0.0", "--cohort", "b", "--json",
                         env=env).stdout)
    assert (job["state"], job["cohort"]) == ("queued", "b") and job["created_by"].endswith(":operator")
    listed = json.loads(cli(training.group, "list", "--json", env=fleet.env("viewer")).stdout)
    assert [j["id"] for j in listed] == [job["id"]]
    shown = json.loads(cli(training.group, "show", job["id"], "--json", env=fleet.env("viewer")).stdout)
    assert shown["parent_version"] == "1.0.0"
    assert json.loads(cli(training.group, "logs", job["id"], "--json", env=env).stdout) == []
    # refusals, each a one-line message
    viewer = cli(training.group, "start", "mlp", "--parent", "1.0.0", env=fleet.env("viewer"), code=4)
    assert "403" in viewer.stderr
    no_policy = cli(training.group, "start", "other", "--parent", "1.0.0", env=env, code=6)
    assert "no training policy" in no_policy.stderr
    cli(training.group, "start", "mlp", "--parent", "9.9.9", env=env, code=5)  # unknown parent
    cli(training.group, "approve", job["id"], env=env, code=6)  # not awaiting approval
    cancelled = json.loads(cli(training.group, "cancel", job["id"], "--json", env=env).stdout)
    assert cancelled["cancel_requested"] is True
    cli(training.group, "show", "tj-nope", env=env, code=5)
    res = httpx.get(f"{fleet.url}/v1/training/jobs")  # no key
    assert res.status_code == 401
    policies = httpx.get(f"{fleet.url}/v1/training/policies",
                         headers={"Authorization": f"Bearer {fleet.keys['viewer']}"}).json()
    assert policies[0]["model"] == "mlp" and policies[0]["trainer"]["env"] == {"MODEL_STORE_TOKEN": "***"}
    audit = httpx.get(f"{fleet.url}/v1/audit", headers={"Authorization": f"Bearer {fleet.keys['admin']}"},
                      params={"limit": 50}).json()["items"]
    actions = {a["action"] for a in audit}
    assert {"training_job.create", "training_job.cancel"} <= actions
