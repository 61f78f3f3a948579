"""The package boundaries the brief fixes: agent never imports fleet; CLI groups exist; no
import circles between project modules, and no unexplained function-local imports.

Also the tests' own layout: tests mirror the source below `tests/`, share code only through
`tests/support` (never by importing another test module or a conftest), and the product
package ships no test hooks or drivers (those live in `tests/support`).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.import_graph import ImportEdge, circles, cycles, import_edges

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


@pytest.mark.unit
def test_agent_code_never_imports_pydantic() -> None:
    # pydantic costs an idle daemon ~10 MB of RSS (docs/benchmarks.md, agent_footprint); only
    # the hook that lets the fleet's pydantic models hold agent structs names pydantic_core.
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"pydantic", "pydantic_core", "pydantic_settings"})
        for p in (ROOT / "agent").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {"agent/contract/strict.py": ["pydantic_core"]}


@pytest.mark.integration
def test_the_daemon_and_its_config_load_without_pydantic(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from agent.config import parse_config\n"
        "import agent.daemon.core, agent.cli.agent_commands\n"
        "import agent.contract.director, agent.contract.manifest\n"
        "cfg = parse_config('{\"device_id\": \"gw-1\", \"mqtt\": {\"port\": 1884}}')\n"
        "assert cfg.mqtt.client_id == 'gw-1'\n"
        "print(sorted(m for m in sys.modules if m.startswith('pydantic')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.unit
def test_the_top_of_tests_holds_only_session_wide_files() -> None:
    top = {p.name for p in (ROOT / "tests").glob("*.py")}
    assert top == {"__init__.py", "conftest.py", "test_docs.py", "test_layout.py", "test_lock.py"}


@pytest.mark.unit
def test_no_test_module_imports_another_test_module_or_a_conftest() -> None:
    bad: list[str] = []
    for p in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or "", *(a.name for a in node.names)]  # `from . import test_x`
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            parts = {part for m in mods for part in m.split(".")}
            if any(part == "conftest" or part.startswith("test_") for part in parts):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert bad == []


@pytest.mark.unit
def test_the_product_carries_no_test_hooks() -> None:
    # a test that must crash the daemon at a state uses tests.support.kill_at; the lifecycle's
    # kill-the-process driver is tests.support.lifecycle_process
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "agent").rglob("*.py")
        if "EDGEFLEET_TEST" in p.read_text() or p.stem.startswith("_harness")
    ]
    assert offenders == []


@pytest.mark.unit
def test_no_import_cycle_between_project_modules() -> None:
    """agent/, fleet/ and simulators/ form no import circle, counting imports inside functions
    (a function-local import only hides a circle). Imports under `if TYPE_CHECKING:` are left
    out: they never run, so they cannot make a module see a half-initialised one."""
    found = circles(e for e in import_edges() if not e.type_checking)
    assert not found, "import circles:\n" + "\n".join(c.describe() for c in found)


@pytest.mark.unit
def test_function_local_imports_of_project_modules_say_why() -> None:
    """An import of a project module inside a function is either a lazy import whose line says
    why (`# lazy: <what it keeps out of memory or start-up>`) or belongs at the top of the file."""
    unexplained = [
        f"{e.where()}: {e.text.strip()}" for e in import_edges()
        if e.in_function and not re.search(r"#\s*lazy:\s*\S", e.text)
    ]
    assert not unexplained, "function-local imports without `# lazy: why`:\n" + "\n".join(unexplained)


@pytest.mark.unit
def test_the_import_graph_sees_function_local_and_type_checking_imports() -> None:
    edges = import_edges()
    local = {(e.source, e.target) for e in edges if e.in_function}
    assert ("agent.daemon.core", "agent.transport.mqtt_fetcher") in local
    assert ("agent.trust", "agent.trust.fetchers") in local  # `from agent.trust import fetchers`
    typing_only = {(e.source, e.target) for e in edges if e.type_checking}
    assert ("agent.daemon.core", "agent.transport.mqtt_fetcher") in typing_only
    assert cycles([ImportEdge("a", "b", "a.py", 1, True, False, ""),
                   ImportEdge("b", "a", "b.py", 1, False, False, "")]) == [({"a", "b"}, ["a", "b", "a"])]
