"""The database layer's boundaries: fleet/db imports no feature slice, the slice repositories
do not import the `Store` facade, and only fleet/db opens a SQLite file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
FLEET = ROOT / "fleet"
SLICE_REPOS = ("fleet/access/credentials.py", "fleet/devices/inventory.py", "fleet/registry/versions.py")


def _fleet_imports(path: Path) -> set[str]:
    """Every `fleet...` module the file imports, at any depth (TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "fleet" or n.startswith("fleet."))
    return found


@pytest.mark.unit
def test_the_db_layer_imports_no_feature_slice() -> None:
    bad = {
        str(p.relative_to(ROOT)): sorted(m for m in _fleet_imports(p)
                                         if not m.startswith("fleet.db") and m != "fleet.errors")
        for p in (FLEET / "db").rglob("*.py")
    }
    assert {k: v for k, v in bad.items() if v} == {}


@pytest.mark.unit
def test_slice_repositories_build_on_fleet_db_not_on_the_store_facade() -> None:
    bad = {name: sorted(m for m in _fleet_imports(ROOT / name) if m == "fleet.store") for name in SLICE_REPOS}
    assert {k: v for k, v in bad.items() if v} == {}


@pytest.mark.unit
def test_only_fleet_db_connects_to_a_database() -> None:
    """No module outside fleet/db opens SQLite or PostgreSQL itself (one layer, one set of
    pragmas, one pool); the engine is made in fleet/db/engine.py."""
    callers: set[str] = set()
    for p in FLEET.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in ("sqlite3", "sqlite_utils", "psycopg", "psycopg2") for n in names):
                    callers.add(str(p.relative_to(ROOT)))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "create_engine":
                callers.add(str(p.relative_to(ROOT)))
    assert callers == {"fleet/db/engine.py"}


@pytest.mark.unit
def test_the_store_layer_has_no_function_local_project_imports() -> None:
    files = [*(FLEET / "db").rglob("*.py"), FLEET / "store.py", *(ROOT / n for n in SLICE_REPOS)]
    bad = []
    for p in files:
        for fn in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                bad += [f"{p.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(fn)
                        if isinstance(n, ast.Import | ast.ImportFrom) and _names_a_project_module(n)]
    assert bad == []


def _names_a_project_module(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        names = [node.module or ""] if node.level == 0 else ["fleet"]  # a relative import is ours
    else:
        names = [a.name for a in node.names]
    return any(n.split(".")[0] in ("fleet", "agent") for n in names)
