"""The lock file (.ci/requirements.lock) satisfies pyproject.toml and is what this venv runs.

The first test fails when someone narrows or widens a range in pyproject.toml without
`bash .ci/lock`; the second when a venv was built from something other than the lock (a stale
or hand-made environment that would hide what a fresh clone installs).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".ci" / "requirements.lock"
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?\s*\\?$")


def locked_for_this_platform(text: str) -> dict[str, Version]:
    """name -> version of every pin whose marker holds here."""
    pins: dict[str, Version] = {}
    for line in text.splitlines():
        m = _PIN.match(line)
        if not m:
            continue
        if m["marker"] and not Marker(m["marker"]).evaluate():
            continue
        name = canonicalize_name(m["name"])
        assert name not in pins, f"{name} is locked twice for this platform"
        pins[name] = Version(m["version"])
    return pins


def wanted_requirements(pyproject: dict[str, object], extras: tuple[str, ...]) -> list[Requirement]:
    """The requirements of edgefleet[extras], self-references (`edgefleet[agent]`) expanded."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    optional = project["optional-dependencies"]
    out: list[Requirement] = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for raw in optional[extra]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == "edgefleet":
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


@pytest.mark.unit
def test_the_lock_satisfies_every_range_in_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = locked_for_this_platform(LOCK.read_text())
    stale = []
    for req in wanted_requirements(pyproject, ("all", "dev")):
        if req.marker and not req.marker.evaluate():
            continue
        got = pins.get(canonicalize_name(req.name))
        if got is None or not req.specifier.contains(got, prereleases=True):
            stale.append(f"{req} (locked: {got})")
    assert not stale, f"the lock no longer satisfies pyproject.toml, run `bash .ci/lock`: {stale}"


@pytest.mark.unit
def test_this_environment_is_the_locked_one() -> None:
    pins = locked_for_this_platform(LOCK.read_text())
    differ = []
    for name, version in sorted(pins.items()):
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differ.append(f"{name}: locked {version}, installed {installed}")
    assert not differ, f"this venv is not the locked environment, run `bash .ci/setup`: {differ}"


@pytest.mark.unit
def test_the_pin_parser_reads_markers_and_refuses_duplicates() -> None:
    text = (
        "a==1.0 \\\n    --hash=sha256:00\n"
        "b==2.0 ; python_version < '3' \\\n"
        "b==3.0 ; python_version >= '3' \\\n"
    )
    assert locked_for_this_platform(text) == {"a": Version("1.0"), "b": Version("3.0")}
    with pytest.raises(AssertionError, match="locked twice"):
        locked_for_this_platform("a==1.0\na==2.0\n")
