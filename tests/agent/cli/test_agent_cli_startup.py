"""`edgefleet agent run` starts without scanning package metadata it does not need.

The `agent` group is resolved without the `edgefleet.commands` entry-point scan, and the daemon
loads no pydantic (whose plugin discovery is another full scan; docs/agent.md, "Memory"). Each
check runs the real CLI in a fresh interpreter with `importlib.metadata.entry_points` wrapped to
record its calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.cli.agent_commands import _trim_heap_when_ready

ROOT = Path(__file__).resolve().parents[3]

RUN_CLI = """
import importlib.metadata as md, json, os, sys
calls = []
real = md.entry_points
def recording(**kw):
    calls.append(kw.get("group"))
    return real(**kw)
md.entry_points = recording
from agent.cli.main import cli
try:
    cli.main(args=sys.argv[1:], prog_name="edgefleet", standalone_mode=False)
except Exception as exc:
    print(type(exc).__name__, exc, file=sys.stderr)
built = "agent.config" in sys.modules
pydantic = sorted(m for m in sys.modules if m.split(".")[0] == "pydantic")
crypto = sorted(m for m in sys.modules if m.split(".")[0] == "cryptography")
print(json.dumps({"calls": calls, "built": built, "pydantic": pydantic, "cryptography": crypto}))
"""


def _run(args: list[str]) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    out = subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.integration
def test_agent_run_scans_no_entry_points(tmp_path: Path) -> None:
    # A config that does not exist: the command builds the config model, then fails cleanly.
    result = _run(["agent", "run", "--config", str(tmp_path / "missing.json")])
    assert result["built"] is True  # the agent's config module was loaded
    assert result["calls"] == []
    assert result["pydantic"] == []


@pytest.mark.integration
def test_agent_run_without_a_client_certificate_loads_no_cryptography(tmp_path: Path) -> None:
    # The start-up identity check reads a certificate's expiry only when one is configured:
    # cryptography's Rust extension is ~9 MB RSS (docs/benchmarks.md, agent_footprint).
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"device_id": "dev-1", "state_dir": str(tmp_path / "state"),
                                  "bootstrap_root": str(tmp_path / "missing-root.json"),
                                  "api": {"http_enabled": False, "unix_enabled": False}}))
    result = _run(["agent", "run", "--config", str(config)])  # fails on the missing root, after the check
    assert result["built"] is True
    assert result["cryptography"] == []


@pytest.mark.integration
def test_other_groups_and_help_still_come_from_entry_points() -> None:
    result = _run(["bundle", "--help"])
    assert result["calls"] == ["edgefleet.commands"]


@pytest.mark.integration
def test_heap_trim_waits_for_ready() -> None:
    ready = threading.Event()
    worker = threading.Thread(target=_trim_heap_when_ready, args=(ready,), daemon=True)
    worker.start()
    worker.join(0.2)
    assert worker.is_alive()  # nothing happens before the daemon serves
    ready.set()
    worker.join(30)
    assert not worker.is_alive()
