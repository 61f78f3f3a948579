"""docs/lifecycle.md shows the table and the diagram the code actually uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.lifecycle.machine import render_mermaid, render_table

DOC = Path(__file__).resolve().parents[3] / "docs" / "lifecycle.md"


@pytest.mark.integration
def test_docs_show_the_current_table_and_diagram() -> None:
    text = DOC.read_text()
    assert render_table() in text
    assert render_mermaid() in text
