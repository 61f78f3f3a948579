"""docs/rollouts.md shows the rollout lifecycle table and diagram the code actually uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.rollouts.machine import REGENERATE, render_docs, render_mermaid, render_table

DOC = Path(__file__).resolve().parents[3] / "docs" / "rollouts.md"


@pytest.mark.unit
def test_docs_show_the_current_table_and_diagram() -> None:
    text = DOC.read_text()
    fix = f"docs/rollouts.md differs from fleet/rollouts/machine.py: replace the block under " \
          f"'## The lifecycle table' with the output of\n    {REGENERATE}"
    assert render_docs() in text, fix
    assert f"<!-- generated: {REGENERATE} -->\n{render_docs()}\n" in text, fix


@pytest.mark.unit
def test_the_diagram_has_every_edge_and_ends_in_the_terminal_states() -> None:
    diagram, table = render_mermaid(), render_table()
    assert diagram.startswith("stateDiagram-v2\n    [*] --> pending\n")
    assert "    completed --> rolling_back: rollback_requested" in diagram
    assert "    running --> rolling_back: gate_breach_abort, abort_requested, rollback_requested" in diagram
    assert diagram.endswith(
        "    aborted --> [*]\n    rolled_back --> [*]\n    failed --> [*]\n    cancelled --> [*]")
    assert "| `rolling_back` | `revert_finished` | `aborted` |" in table
    assert "| `rolling_back` | `rollback_finished` | `rolled_back` |" in table
