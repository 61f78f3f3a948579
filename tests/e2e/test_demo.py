"""The CLI end to end: `edgefleet sim run` with a small swarm against a private Mosquitto,
asserting the JSON verdicts; `sim list`; usage errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--log-level", "WARNING", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


@pytest.mark.slow  # a whole scenario: in CI's long-test step
def test_sim_run_rollout_scenarios_writes_passing_verdicts(tmp_path: Path) -> None:
    out, html = tmp_path / "verdicts.json", tmp_path / "report.html"
    res = _cli("sim", "run", "--devices", "6", "--processes", "2", "--scenario", "canary_rollout",
               "--scenario", "bad_model_abort", "--json", str(out), "--html", str(html))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [s["name"] for s in doc["scenarios"]] == ["canary_rollout", "bad_model_abort"]
    assert all(s["passed"] for s in doc["scenarios"]), doc
    assert doc["elapsed_s"] > 0 and doc["devices"] == 6
    canary = doc["scenarios"][0]
    assert canary["metrics"]["devices"] == 6
    assert "succeeded" in canary["series"]["rollout progress (devices by status, stage)"]
    abort = doc["scenarios"][1]
    assert abort["metrics"]["rolled_back"] >= 1
    page = html.read_text()
    assert "canary_rollout" in page and "<svg" in page
    assert "PASS" in res.stdout
    # Not a terminal: a few plain lines and the summary; the logs went to the file named first.
    logfile = tmp_path / "sim.log"
    assert res.stdout.splitlines()[0] == f"logs: {logfile}" and logfile.is_file()
    assert "[1/2] canary_rollout (6 devices) ..." in res.stdout and len(res.stdout.splitlines()) < 40
    assert not re.search(r"^\d\d:\d\d:\d\d [DIWE] ", res.stdout + res.stderr, re.M)  # no log line


def test_sim_list_and_usage_errors() -> None:
    listed = _cli("sim", "list", timeout=60)
    assert listed.returncode == 0
    for name in ("canary_rollout", "bad_model_abort", "drift_alert", "offline_and_broker_restart",
                 "attacker_refused", "ab_experiment"):
        assert name in listed.stdout
    bad = _cli("sim", "run", "--scenario", "nope", timeout=60)
    assert bad.returncode != 0 and "unknown scenario" in bad.stderr
    url = _cli("sim", "run", "--broker", "http://x", "--scenario", "canary_rollout", timeout=60)
    assert url.returncode != 0 and "expected mqtt://host:port" in url.stderr


def test_demo_writes_the_fleet_openapi_document(tmp_path: Path) -> None:
    from simulators.cli import write_openapi

    out = tmp_path / "edgefleet-demo-report-openapi.json"
    write_openapi(out)
    doc = json.loads(out.read_text())
    assert doc["info"]["title"] == "edgefleet fleet API"
    assert {"/v1/rollouts", "/v1/devices", "/v1/drift"} <= set(doc["paths"])
