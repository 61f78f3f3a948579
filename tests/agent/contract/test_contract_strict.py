"""`StrictStruct` (agent/contract/strict.py): the agent's validation base without pydantic."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from pydantic import BaseModel, ValidationError

from agent.config import AgentConfig, parse_config
from agent.contract.director import DirectorDocument, TargetRef
from agent.contract.manifest import HealthPolicy
from agent.contract.protocol import Event
from agent.contract.strict import describe
from agent.transport.mqtt_config import MqttConfig

ROOT = Path(__file__).resolve().parents[3]
REF = {"path": "models/m.efb", "length": 10, "sha256": "a" * 64}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({**REF, "bogus": 1}, "bogus: unknown field (not allowed)"),
        ({"path": "x"}, "length: required field missing"),
        ({**REF, "length": 0}, "length: Expected `int` >= 1"),
        ({**REF, "path": "../x"}, "target path must be relative, without '..' or backslashes"),
    ],
)
def test_errors_name_the_field_and_the_rule(data: dict[str, object], expected: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        TargetRef.model_validate(data)
    assert describe(info.value) == expected


@pytest.mark.unit
def test_nested_paths_are_dotted() -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        AgentConfig.model_validate({"device_id": "g", "mqtt": {"client_id": "g"}, "api": {"max_batch": 0}})
    assert describe(info.value) == "api.max_batch: Expected `int` >= 1"


@pytest.mark.unit
def test_direct_construction_and_copies_are_validated_like_decoding() -> None:
    with pytest.raises(ValueError, match=r"latency_budget_ms"):
        HealthPolicy(latency_budget_ms=-1.0)
    with pytest.raises(ValueError, match=r"\$\.port"):
        MqttConfig(client_id="c", port=70000)
    with pytest.raises(ValueError, match="sha256"):
        TargetRef(**{**REF, "sha256": "A" * 64})  # type: ignore[arg-type]
    ok = HealthPolicy(probation_requests=3)
    with pytest.raises(ValueError, match="probation_requests"):
        ok.model_copy(update={"probation_requests": -1})
    with pytest.raises(AttributeError):
        ok.probation_requests = 5  # type: ignore[misc]  # frozen


@pytest.mark.unit
def test_dumps_follow_pydantic_modes() -> None:
    doc = DirectorDocument(
        device_id="gw-1",
        sequence=2,
        issued_at=datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC),
        expires=datetime(2030, 1, 2, tzinfo=UTC),
        target=TargetRef(**REF),  # type: ignore[arg-type]
    )
    assert doc.issued_at.microsecond == 0  # normalised by its rules
    assert isinstance(doc.model_dump()["issued_at"], datetime)  # python mode keeps objects
    dumped = doc.model_dump(mode="json", exclude_none=True)
    assert dumped["issued_at"] == "2030-01-01T12:00:00Z" and "cohort" not in dumped and "shadow" not in dumped
    assert DirectorDocument.model_validate_json(doc.model_dump_json()) == doc
    cfg = parse_config('{"device_id": "gw-1", "mqtt": {}, "state_dir": "/tmp/x"}')
    assert cfg.state_dir == Path("/tmp/x") and cfg.model_dump(mode="json")["state_dir"] == "/tmp/x"
    secret = MqttConfig(client_id="c", username="u", password="s3cret")
    assert "s3cret" not in repr(secret) and secret.password == "s3cret"


@pytest.mark.unit
def test_a_fleet_pydantic_model_can_hold_an_agent_struct() -> None:
    class Holder(BaseModel):
        health: HealthPolicy
        event: Event | None = None

    held = Holder.model_validate({"health": {"probation_requests": 4}})
    assert held.health == HealthPolicy(probation_requests=4)
    assert Holder.model_validate_json(held.model_dump_json()).health.probation_requests == 4
    with pytest.raises(ValidationError, match="probation_requests"):
        Holder.model_validate({"health": {"probation_requests": -4}})


RACE = """
import threading
from agent.config import parse_config
from agent.contract.director import DirectorDocument
from agent.contract.manifest import parse_manifest
from agent.contract.protocol import Event, ReportedState, decode_event, encode_event
manifest = open(__import__("sys").argv[1], "rb").read()
event = b'{"schema_version":1,"type":"committed","timestamp":1.0,"seq":3}'
jobs = [
    lambda: parse_manifest(manifest),
    lambda: parse_manifest(manifest),
    lambda: decode_event(event, "d"),
    lambda: Event(type="x", timestamp=1.0, seq=1),
    lambda: ReportedState(timestamp=1.0),
    lambda: parse_config('{"device_id": "gw-1", "mqtt": {}}'),
    lambda: DirectorDocument.model_validate({"cohort": "c", "sequence": 1,
        "issued_at": "2030-01-01T00:00:00Z", "expires": "2030-01-02T00:00:00Z",
        "target": {"path": "a", "length": 1, "sha256": "a" * 64}}),
    lambda: parse_manifest(manifest),
]
gate = threading.Barrier(len(jobs))
errors = []
def run(job):
    gate.wait()
    try:
        job()
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
for t in threads: t.start()
for t in threads: t.join(30)
print(errors or "ok")
"""


@pytest.mark.integration
def test_first_use_from_many_threads_at_once_is_safe(tmp_path: Path) -> None:
    # msgspec builds a type's decoder on first use; unserialised, 8 threads doing that at once
    # crashed the interpreter in 16 of 40 fresh processes. Each run here is a fresh interpreter.
    from simulators.models import make_mlp_onnx, mlp_manifest

    (tmp_path / "manifest.json").write_bytes(mlp_manifest(make_mlp_onnx(0), version="1.0.0").to_json())
    for _ in range(10):
        out = subprocess.run(
            [sys.executable, "-c", RACE, str(tmp_path / "manifest.json")],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr[-2000:]
