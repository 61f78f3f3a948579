"""The package boundaries the brief fixes: agent never imports fleet; CLI groups exist."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.unit
def test_agent_never_imports_fleet_or_simulators() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"fleet", "simulators"})
        for p in (ROOT / "agent").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.unit
def test_fleet_imports_only_the_agent_contract() -> None:
    # agent.transport: the MQTT client library the fleet publisher shares (not the daemon).
    allowed = ("agent.contract", "agent.errors", "agent.trust", "agent.logs", "agent.transport")
    bad: list[str] = []
    for p in (ROOT / "fleet").rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            mods: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            for m in mods:
                if m.split(".")[0] == "agent" and not m.startswith(allowed):
                    bad.append(f"{p.relative_to(ROOT)}: {m}")
    assert bad == []


@pytest.mark.integration
@pytest.mark.parametrize("group", ["keys", "bundle", "repo", "fleet", "agent", "sim", "demo", "telemetry"])
def test_every_cli_group_has_help(group: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", group, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout
    assert "unavailable" not in out.stdout
