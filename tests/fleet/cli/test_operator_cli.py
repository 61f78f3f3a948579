"""The operator CLI (`edgefleet models|devices|rollouts|experiments|alerts`) against a real fleet API.

Every group runs in-process (click's CliRunner) and talks HTTP to a real `FleetService` on a
loopback port: lists page through cursors (the server's page size is 2 here), `--json` is
parseable, and each failure (401, 403, 404, 409, 422, server down, no key) is one line with
its exit code and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner, Result

from agent.cli import main as root
from agent.contract.bundle import write_bundle
from fleet.cli import alerts, collections, datasets, devices, experiments, models, rollouts, training
from fleet.cli.api_client import (
    EXIT_AUTH,
    EXIT_CONFLICT,
    EXIT_CONNECT,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
)
from simulators.models import make_mlp_onnx
from tests.support.broker import free_port
from tests.support.cli_runner import as_json, cli
from tests.support.lifecycle_world import FAST, manifest_for
from tests.support.running_fleet import RunningFleet, running_fleet

ROOT = Path(__file__).resolve().parents[3]
GROUPS = {"models": models.group, "devices": devices.group, "rollouts": rollouts.group,
          "experiments": experiments.group, "alerts": alerts.group, "collections": collections.group,
          "datasets": datasets.group, "training": training.group}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[RunningFleet]:
    with running_fleet(tmp_path / "fleet") as f:
        yield f


def bundle(tmp_path: Path, version: str, seed: int = 1, hidden: int = 64) -> Path:
    model = make_mlp_onnx(seed, sizes=(32, hidden, hidden, 4))
    return write_bundle(manifest_for(version, model, seed, FAST), model, tmp_path / f"mlp-{version}.efb")


def one_line_error(result: Result, *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.integration
def test_models_publish_list_show_and_stage(fleet: RunningFleet, tmp_path: Path) -> None:
    env = fleet.env()
    out = cli(models.group, "publish", str(bundle(tmp_path, "1.0.0")), env=env)
    assert out.stdout.strip() == "mlp:1.0.0" and "models/mlp/mlp-1.0.0.efb" in out.stderr
    listed = as_json(models.group, "list", env=env)
    assert [m["name"] for m in listed] == ["mlp"]
    shown = as_json(models.group, "show", "mlp", env=env)
    assert [v["id"] for v in shown["versions"]] == ["mlp:1.0.0"]
    table = cli(models.group, "show", "mlp", env=env).stdout
    assert "mlp:1.0.0" in table and "models/mlp/mlp-1.0.0.efb" in table
    staged = as_json(models.group, "stage", "mlp", "1.0.0", "staging", "--note", "smoke", env=env)
    assert staged["stage"] == "staging"
    version = as_json(models.group, "show", "mlp", "1.0.0", env=env)
    assert [h["to_stage"] for h in version["history"]] == ["registered", "staging"]
    assert [v["id"] for v in as_json(models.group, "versions", "mlp", "--stage", "staging", env=env)] \
        == ["mlp:1.0.0"]
    # Larger than the 1 MiB JSON body limit: uploads stream to disk under the artifact limit.
    big = bundle(tmp_path, "2.0.0", hidden=640)
    assert big.stat().st_size > fleet.settings.limits.max_body_bytes
    assert cli(models.group, "publish", str(big), env=env).stdout.strip() == "mlp:2.0.0"
    again = cli(models.group, "publish", str(bundle(tmp_path, "1.0.0")), env=env, code=EXIT_CONFLICT)
    one_line_error(again, "409", "already exists")
    junk = tmp_path / "junk.efb"
    junk.write_bytes(b"not a bundle")
    one_line_error(cli(models.group, "publish", str(junk), env=env, code=1), "not a bundle")
    one_line_error(cli(models.group, "create", "Bad Name", env=env, code=EXIT_INVALID), "422", "name")


@pytest.mark.integration
def test_lists_page_through_cursors(fleet: RunningFleet) -> None:
    env = fleet.env()
    names = [f"m{i}" for i in range(5)]
    for name in names:
        cli(models.group, "create", name, "--description", f"model {name}", env=env)
    assert [m["name"] for m in as_json(models.group, "list", env=env)] == names  # 3 pages of 2
    assert len(as_json(models.group, "list", "--limit", "3", env=env)) == 3
    table = cli(models.group, "list", env=env).stdout
    assert all(f"model {n}" in table for n in names)


@pytest.mark.integration
def test_rollout_pause_resume_promote_abort_without_devices(fleet: RunningFleet, tmp_path: Path) -> None:
    env = fleet.env()
    cli(models.group, "publish", str(bundle(tmp_path, "1.0.0")), env=env)
    created = as_json(rollouts.group, "create", "mlp:1.0.0", "--selector", "env=prod", "--kind", "canary",
                      "--strategy", '{"stages": [50, 100], "bake_s": 5}',
                      "--threshold", "max_install_failure_pct=10", env=env)
    rid = created["id"]
    assert created["strategy"] == {"kind": "canary", "stages": [50, 100], "bake_s": 5}
    assert created["thresholds"] == {"max_install_failure_pct": 10.0}
    assert [r["id"] for r in as_json(rollouts.group, "list", "--state", "pending", env=env)] == [rid]
    shown = as_json(rollouts.group, "show", rid, env=env)
    assert (shown["state"], shown["desired"], shown["devices_total"]) == ("pending", "run", 0)
    assert as_json(rollouts.group, "pause", rid, "--note", "hold", env=env)["desired"] == "pause"
    one_line_error(cli(rollouts.group, "pause", rid, env=env, code=EXIT_CONFLICT), "409", "already")
    assert as_json(rollouts.group, "resume", rid, env=env)["desired"] == "run"
    one_line_error(cli(rollouts.group, "resume", rid, env=env, code=EXIT_CONFLICT), "409", "not paused")
    cli(rollouts.group, "promote", rid, env=env)
    one_line_error(cli(rollouts.group, "promote", rid, env=env, code=EXIT_CONFLICT), "pending promote")
    assert as_json(rollouts.group, "devices", rid, env=env) == []
    aborted = cli(rollouts.group, "abort", rid, "--note", "enough", env=env)
    assert "the controller acts on its next tick" in aborted.stderr
    history = [h["event"] for h in as_json(rollouts.group, "show", rid, env=env)["history"]]
    assert history == ["created", "requested:pause", "requested:resume", "requested:abort"]
    one_line_error(cli(rollouts.group, "resume", rid, env=env, code=EXIT_CONFLICT), "abort")
    one_line_error(cli(rollouts.group, "create", "mlp:1.0.0", "--selector", "env=prod", "--strategy",
                       '{"kind": "bogus"}', env=env, code=EXIT_INVALID), "422", "strategy")
    bad = cli(rollouts.group, "create", "mlp:1.0.0", "--selector", "x", "--threshold", "a=b", env=env, code=2)
    assert "not a number" in bad.stderr


@pytest.mark.integration
def test_devices_tokens_label_and_revoke(fleet: RunningFleet) -> None:
    env = fleet.env()
    token = cli(devices.group, "create-token", "--labels", "env=prod,site=lab", "--ttl", "600", env=env)
    secret = token.stdout.strip()
    assert secret.startswith("eft_") and "shown only once" in token.stderr
    unused = as_json(devices.group, "tokens", "--unused", env=env)
    assert len(unused) == 1 and unused[0]["labels"] == {"env": "prod", "site": "lab"}
    spare = as_json(devices.group, "create-token", env=env)
    cli(devices.group, "withdraw-token", spare["id"], env=env)
    one_line_error(cli(devices.group, "withdraw-token", spare["id"], env=env, code=EXIT_NOT_FOUND), "404")
    enrolled = _enroll(fleet, secret)
    dev = enrolled["device_id"]
    assert [d["id"] for d in as_json(devices.group, "list", "--selector", "site=lab", env=env)] == [dev]
    assert as_json(devices.group, "list", "--selector", "site=elsewhere", env=env) == []
    assert as_json(devices.group, "list", "--online", env=env) == []
    assert dev in cli(devices.group, "show", dev, env=env).stdout
    relabeled = as_json(devices.group, "label", dev, "env=staging", env=env)
    assert relabeled["labels"] == {"env": "staging"}
    revoked = cli(devices.group, "revoke", dev, "--reason", "test", env=env)
    assert "was not reloaded" in revoked.stderr  # no broker hook configured in this fleet
    assert [d["id"] for d in as_json(devices.group, "list", "--revoked", env=env)] == [dev]
    one_line_error(cli(devices.group, "revoke", dev, env=env, code=EXIT_CONFLICT), "409")
    one_line_error(cli(devices.group, "list", "--selector", "region in (eu", env=env, code=EXIT_INVALID),
                   "422")


def _enroll(fleet: RunningFleet, token: str) -> dict[str, Any]:
    res = httpx.post(f"{fleet.url}/v1/enroll", json={"runtimes": ["onnx"]},
                     headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert res.status_code == 201, res.text
    return dict(res.json())


@pytest.mark.integration
def test_experiments_create_show_recommend_stop(fleet: RunningFleet, tmp_path: Path) -> None:
    env = fleet.env()
    for version, seed in (("1.0.0", 1), ("1.1.0", 2)):
        cli(models.group, "publish", str(bundle(tmp_path, version, seed)), env=env)
    created = as_json(experiments.group, "create", "ab", "--a", "mlp:1.0.0", "--b", "mlp:1.1.0",
                      "--split-b", "0.3", "--metric", "latency_ms=min", "--min-samples", "5", env=env)
    eid = created["id"]
    assert (created["split_b"], created["metrics"], created["state"]) == (0.3, {"latency_ms": "min"},
                                                                          "running")
    assert [e["id"] for e in as_json(experiments.group, "list", env=env)] == [eid]
    assert "latency_ms" in cli(experiments.group, "show", eid, env=env).stdout
    verdict = cli(experiments.group, "recommend", eid, env=env)
    assert "verdict: inconclusive" in verdict.stderr
    for column in ("effect", "ci low", "ci high", "devices a", "devices b", "devices needed"):
        assert column in verdict.stdout, (column, verdict.stdout)
    assert as_json(experiments.group, "stop", eid, env=env)["state"] == "stopped"
    one_line_error(cli(experiments.group, "show", "exp-nope", env=env, code=EXIT_NOT_FOUND), "404")


@pytest.mark.integration
def test_experiments_create_with_min_devices_and_taus(fleet: RunningFleet, tmp_path: Path) -> None:
    env = fleet.env()
    for version, seed in (("1.0.0", 1), ("1.1.0", 2)):
        cli(models.group, "publish", str(bundle(tmp_path, version, seed)), env=env)
    created = as_json(experiments.group, "create", "ab", "--a", "mlp:1.0.0", "--b", "mlp:1.1.0",
                      "--min-devices", "7", "--tau", "latency_ms=2.5", "--tau", "error_rate=0.02", env=env)
    assert created["min_devices"] == 7
    assert created["taus"] == {"latency_ms": 2.5, "error_rate": 0.02}
    shown = as_json(experiments.group, "show", created["id"], env=env)
    assert (shown["min_devices"], shown["taus"]) == (7, created["taus"])
    bad = cli(experiments.group, "create", "ab2", "--a", "mlp:1.0.0", "--b", "mlp:1.1.0",
              "--tau", "latency_ms=fast", env=env, code=2)
    assert "not a number" in bad.output
    one_line_error(cli(experiments.group, "create", "ab3", "--a", "mlp:1.0.0", "--b", "mlp:1.1.0",
                       "--tau", "latency_ms=-1", env=env, code=EXIT_INVALID), "422")


@pytest.mark.integration
def test_alerts_list_and_ack(fleet: RunningFleet) -> None:
    env = fleet.env()
    assert as_json(alerts.group, "list", "--unacked", env=env) == []
    assert "no alerts" in cli(alerts.group, "list", "--kind", "drift", env=env).stderr
    one_line_error(cli(alerts.group, "ack", "1", "--note", "seen", env=env, code=EXIT_NOT_FOUND), "404")
    one_line_error(cli(alerts.group, "list", "--kind", "nonsense", env=env, code=EXIT_INVALID), "422")


@pytest.mark.integration
def test_api_errors_are_one_line_messages(fleet: RunningFleet, tmp_path: Path) -> None:
    wrong = cli(models.group, "list", env=fleet.env(EDGEFLEET_API_KEY="efk_wrong"), code=EXIT_AUTH)
    one_line_error(wrong, "not authorised (401)", "EDGEFLEET_API_KEY")
    viewer = cli(models.group, "create", "m", env=fleet.env("viewer"), code=EXIT_AUTH)
    one_line_error(viewer, "forbidden (403)", "operator")
    one_line_error(cli(rollouts.group, "show", "ro-nope", env=fleet.env(), code=EXIT_NOT_FOUND),
                   "not found (404)", "ro-nope")
    one_line_error(cli(models.group, "show", "nope", env=fleet.env(), code=EXIT_NOT_FOUND), "nope")
    no_key = cli(devices.group, "list", env=fleet.env(EDGEFLEET_API_KEY=""), code=EXIT_AUTH)
    one_line_error(no_key, "no API key", "--api-key")
    down = f"http://127.0.0.1:{free_port()}"
    refused = cli(models.group, "list", "--url", down, env=fleet.env(), code=EXIT_CONNECT)
    one_line_error(refused, "cannot connect", down, "refused")
    one_line_error(cli(models.group, "list", "--url", "ftp://x", env=fleet.env(), code=1), "http(s)")
    # The same in a real process: exit code and stderr, no traceback.
    proc = subprocess.run([sys.executable, "-m", "fleet.cli.models", "list", "--url", down],
                          env={**os.environ, **fleet.env()}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_CONNECT and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: cannot connect") and proc.stdout == ""


@pytest.mark.integration
def test_url_and_key_from_flags_environment_and_config_file(fleet: RunningFleet, tmp_path: Path) -> None:
    config = tmp_path / "cli.toml"
    config.write_text(f'url = "{fleet.url}"\napi_key = "{fleet.keys["viewer"]}"\n')
    config.chmod(0o600)
    base = {"EDGEFLEET_CONFIG": str(config), "XDG_CONFIG_HOME": str(tmp_path)}
    quiet = cli(models.group, "list", env=base)
    assert "warning" not in quiet.stderr
    config.chmod(0o644)
    loud = cli(models.group, "list", env=base)
    assert "mode 0644" in loud.stderr and "chmod 600" in loud.stderr
    config.chmod(0o600)
    # The environment beats the file, a flag beats both (the file's viewer key may not create).
    cli(models.group, "create", "a", env=base, code=EXIT_AUTH)
    cli(models.group, "create", "a", env={**base, "EDGEFLEET_API_KEY": fleet.keys["operator"]})
    cli(models.group, "create", "b", "--api-key", fleet.keys["operator"],
        env={**base, "EDGEFLEET_API_KEY": "efk_wrong"})
    down = f"http://127.0.0.1:{free_port()}"
    cli(models.group, "list", env={**base, "EDGEFLEET_URL": down}, code=EXIT_CONNECT)
    cli(models.group, "list", "--url", fleet.url, env={**base, "EDGEFLEET_URL": down})
    # ~/.config/edgefleet/cli.toml (XDG_CONFIG_HOME) when EDGEFLEET_CONFIG is not set.
    home = tmp_path / "xdg" / "edgefleet"
    home.mkdir(parents=True)
    (home / "cli.toml").write_text(config.read_text())
    (home / "cli.toml").chmod(0o600)
    xdg = {"EDGEFLEET_CONFIG": "", "XDG_CONFIG_HOME": str(home.parent)}
    assert len(as_json(models.group, "list", env=xdg)) == 2
    config.write_text('url = "http://x"\napi_keys = "typo"\n')
    one_line_error(cli(models.group, "list", env=base, code=1), "unknown key", "api_keys")
    one_line_error(cli(models.group, "list", env={**base, "EDGEFLEET_CONFIG": str(tmp_path / "nope.toml")},
                       code=1), "does not exist")


@pytest.mark.unit
def test_every_group_is_an_entry_point_the_root_cli_finds() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = meta["project"]["entry-points"]["edgefleet.commands"]
    for name, group in GROUPS.items():
        assert declared[name] == f"fleet.cli.{name}:group"
        assert EntryPoint(name, declared[name], "edgefleet.commands").load() is group
    # The root CLI resolves them through the same entry points (this checkout's pyproject,
    # not whichever copy is installed).
    points = {n: EntryPoint(n, v, "edgefleet.commands") for n, v in declared.items()}
    original = root._PluginGroup._entry_points
    root._PluginGroup._entry_points = lambda self: points  # type: ignore[method-assign]
    try:
        listing = CliRunner().invoke(root.cli, ["--help"])
        for name in GROUPS:
            assert name in listing.stdout
            assert root.cli.get_command(click.Context(root.cli), name) is GROUPS[name]
    finally:
        root._PluginGroup._entry_points = original  # type: ignore[method-assign]


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(GROUPS))
def test_every_command_has_help(name: str) -> None:
    group = GROUPS[name]
    assert CliRunner().invoke(group, ["--help"]).exit_code == 0
    for command in group.list_commands(click.Context(group)):
        result = CliRunner().invoke(group, [command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.stdout, (name, command, result.output)
        assert "--json" in result.stdout and "--url" in result.stdout


@pytest.mark.integration
def test_rollout_approve_by_role_and_policy_refusals(fleet: RunningFleet, tmp_path: Path) -> None:
    env = fleet.env()
    cli(models.group, "publish", str(bundle(tmp_path, "1.0.0")), env=env)
    rid = as_json(rollouts.group, "create", "mlp:1.0.0", "--selector", "env=prod", "--strategy",
                  '{"approval": {"stages": [0], "timeout_s": 600}}', env=env)["id"]
    one_line_error(cli(rollouts.group, "approve", rid, env=env, code=EXIT_CONFLICT), "not awaiting approval")
    fleet.service.store.rollouts.set_state(rid, "awaiting_approval", 0, "controller")
    one_line_error(cli(rollouts.group, "approve", rid, env=fleet.env("viewer"), code=EXIT_AUTH), "403")
    shown = cli(rollouts.group, "show", rid, env=env)
    assert f"stage 0 awaits approval: edgefleet rollouts approve {rid}" in shown.stderr
    approved = cli(rollouts.group, "approve", rid, "--note", "go", env=env)
    assert "approve: recorded" in approved.stderr
    one_line_error(cli(rollouts.group, "create", "mlp:1.0.0", "--selector", "env=prod", "--strategy",
                       '{"windows": {"activation": {"cron": "0 2 * *", "duration_s": 600}}}', env=env,
                       code=EXIT_INVALID), "400", "cron")
