"""The docs name only what is in the repository.

README.md and docs/*.md are read by people who have the repository and nothing else (no
session workspace, no design notes kept elsewhere), so every link and every path they name
must resolve inside it and exist:

- Markdown links `[text](target)` that are not URLs or anchors resolve from the linking file;
- a path climbing out (`../x`) or an absolute path into the workspace the repository was
  developed in (`/work/...`), in a code span, a code block or prose, is refused outright
  (system paths such as `/etc/mosquitto` and the user's `~/.config` are not repository files);
- a code span naming a repository path (starting with a top-level directory of the repo,
  e.g. `fleet/registry/builder.py`) or a Markdown file (`design-notes.md`) must exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} | {".ci"}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
OUTSIDE = re.compile(r"(^|[\s(\"'=])(\.\./|/work/)")
PLACEHOLDER = re.compile(r"[<>*{}$]|\.\.\.")


def _outside(text: str) -> bool:
    return bool(OUTSIDE.search(text))


def _repo_path(token: str) -> str | None:
    """The repository path a code span names, if it names one (else None)."""
    token = token.strip().split("::")[0].split(" ")[0].rstrip(".,:;")
    token = re.sub(r":\d+$", "", token)
    if PLACEHOLDER.search(token) or token.startswith(("http://", "https://", "/", "-")):
        return None
    first = token.split("/")[0]
    if "/" in token and first in TOP:
        return token
    if "/" not in token and token.endswith(".md"):
        return token
    return None


def _exists(doc: Path, path: str) -> bool:
    if "/" not in path:  # a bare Markdown file name: beside the doc, at the top, or in docs/
        return any((d / path).exists() for d in (doc.parent, ROOT, ROOT / "docs"))
    return (ROOT / path).exists() or (doc.parent / path).exists()


def problems_in(doc: Path, text: str) -> list[str]:
    found = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same page
        resolved = (doc.parent / target.split("#")[0]).resolve()
        if resolved != ROOT and ROOT not in resolved.parents:
            found.append(f"link to {target} leaves the repository")
        elif not resolved.exists():
            found.append(f"link to {target}: no such file in the repository")
    prose = FENCE.sub("", text)
    for token in CODE.findall(prose) + [line for block in FENCE.findall(text) for line in block.splitlines()]:
        if _outside(token):
            found.append(f"path outside the repository: {token.strip()}")
            continue
        path = _repo_path(token)
        if path is not None and not _exists(doc, path):
            found.append(f"names {path}, which is not in the repository")
    if _outside(LINK.sub("", CODE.sub("", prose))):
        found.append("prose names a path outside the repository (../, /work/)")
    return found


@pytest.mark.unit
@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_doc_names_only_files_in_the_repository(doc: Path) -> None:
    assert problems_in(doc, doc.read_text(encoding="utf-8")) == []


@pytest.mark.unit
def test_the_check_catches_outside_and_missing_paths() -> None:
    doc = ROOT / "docs" / "example.md"
    bad = ("See [design](../../shared/DESIGN.md), `/work/shared/DESIGN.md`, `../shared/x.md`,\n"
           "[gone](missing.md), `fleet/registry/nope.py` and `DESIGN.md`.\n"
           "```\ncd /work/tuf-conformance\n```\n")
    found = problems_in(doc, bad)
    assert len(found) == 7, found
    good = ("[bundle](bundle.md), [top](../README.md#quick-start), [web](https://example.org/x), "
            "`fleet/registry/builder.py`, `agent/contract/manifest.py::Manifest`, `models/<name>/x.efb`, "
            "`/etc/mosquitto/conf.d`, `model.onnx`, `.../devices/+/telemetry`.\n")
    assert problems_in(doc, good) == []
