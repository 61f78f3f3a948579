"""The JSON Schemas in docs/ are the ones the code validates with (regenerate them when they drift)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.contract.manifest import json_schema
from agent.contract.protocol import json_schemas

DOCS = Path(__file__).resolve().parents[3] / "docs"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("doc", "generate", "command"),
    [
        ("manifest.schema.json", json_schema, "python -m agent.contract.manifest"),
        ("protocol.schema.json", json_schemas, "python -m agent.contract.protocol"),
    ],
)
def test_schema_files_match_the_code(doc: str, generate: object, command: str) -> None:
    on_disk = json.loads((DOCS / doc).read_text())
    assert callable(generate)
    assert on_disk == json.loads(json.dumps(generate())), f"docs/{doc} is stale: `{command} > docs/{doc}`"


@pytest.mark.unit
def test_protocol_schema_names_every_message_and_forbids_unknown_fields() -> None:
    schema = json_schemas()
    assert set(schema["$defs"]) == {"ObjectRequest", "ChunkHeader", "ReportedState", "Event"}
    assert all(d["additionalProperties"] is False for d in schema["$defs"].values())
    assert schema["$defs"]["Event"]["properties"]["type"]["pattern"] == "^[a-z][a-z0-9_.]{0,63}$"
    assert set(schema["$defs"]["Event"]["required"]) == {"type", "timestamp", "seq"}
