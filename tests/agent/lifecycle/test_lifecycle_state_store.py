"""The state record: atomic writes, last-good fallback, schema check; slots and quarantine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import BundleError, ConfigError, MisuseError
from agent.lifecycle.slots import Slots, check_bundle_id, is_quarantined, quarantine
from agent.lifecycle.state_store import DesiredTarget, StateRecord, StateStore

TARGET = DesiredTarget(7, "models/m/m-1.0.0.efb", 10, "a" * 64, "m", "1.0.0",
                       shadow=DesiredTarget(7, "models/m/m-2.0.0.efb", 11, "b" * 64, "m", "2.0.0"))


@pytest.mark.integration
def test_roundtrip_and_previous_copy(tmp_path: Path) -> None:
    store = StateStore(tmp_path, clock=lambda: 123.0)
    rec = StateRecord(state="staged", active="m-0.9.0", staged="m-1.0.0", desired=TARGET,
                      attempts={"staged:m-1.0.0": 1}, quarantined={"m-0.8.0": 3})
    store.save(rec)
    rec.state = "activating"
    store.save(rec)
    loaded = StateStore(tmp_path).load()
    assert loaded == rec and loaded.updated_at == 123.0 and loaded.desired == TARGET
    assert json.loads((tmp_path / "state.json.prev").read_text())["state"] == "staged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.prev"]  # no temp files


@pytest.mark.integration
@pytest.mark.parametrize(
    "garbage", [b"", b'{"schema_version": 1, "sta', b"[]", b'{"schema_version": 1, "x": 1}']
)
def test_corrupt_record_falls_back_to_last_good(tmp_path: Path, garbage: bytes) -> None:
    store = StateStore(tmp_path)
    store.save(StateRecord(active="m-1.0.0"))
    store.save(StateRecord(active="m-2.0.0"))
    (tmp_path / "state.json").write_bytes(garbage)
    assert StateStore(tmp_path).load().active == "m-1.0.0"


@pytest.mark.integration
def test_a_torn_record_is_never_copied_over_the_last_good(tmp_path: Path) -> None:
    StateStore(tmp_path).save(StateRecord(active="m-1.0.0"))
    StateStore(tmp_path).save(StateRecord(active="m-2.0.0"))
    (tmp_path / "state.json").write_bytes(b"{torn")
    fresh = StateStore(tmp_path)  # a new process that saves before loading
    fresh.save(StateRecord(active="m-3.0.0"))
    assert json.loads((tmp_path / "state.json.prev").read_text())["active"] == "m-1.0.0"


@pytest.mark.integration
def test_no_record_means_a_fresh_idle_device(tmp_path: Path) -> None:
    rec = StateStore(tmp_path).load()
    assert rec.state == "idle" and rec.active is None


@pytest.mark.integration
def test_unknown_schema_version_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"schema_version": 99, "state": "idle"}))
    with pytest.raises(ConfigError, match="schema_version 99 is not supported"):
        StateStore(tmp_path).load()


@pytest.mark.integration
def test_unwritable_state_dir_is_misuse(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MisuseError, match="cannot write state record"):
        StateStore(blocker / "state").save(StateRecord())


@pytest.mark.unit
def test_quarantine_holds_until_a_newer_sequence() -> None:
    rec = StateRecord(director_sequence=5)
    quarantine(rec, "m-2.0.0")
    assert is_quarantined(rec, "m-2.0.0", 5) and is_quarantined(rec, "m-2.0.0", 4)
    assert not is_quarantined(rec, "m-2.0.0", 6) and not is_quarantined(rec, "m-1.0.0", 5)
    for i in range(40):
        rec.director_sequence = 10 + i
        quarantine(rec, f"m-{i}.0.0")
    assert len(rec.quarantined) == 32 and "m-39.0.0" in rec.quarantined


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "a..b", "x" * 201])
def test_bundle_ids_must_be_one_safe_path_component(bad: str) -> None:
    with pytest.raises(MisuseError):
        check_bundle_id(bad)


@pytest.mark.integration
def test_gc_keeps_only_the_pointed_at_slots(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    for name in ("m-1.0.0", "m-2.0.0", "m-3.0.0", "m-4.0.0", ".tmp-m-5.0.0-x"):
        (slots.root / name).mkdir()
    (slots.downloads / "old.efb").write_bytes(b"x")
    rec = StateRecord(active="m-2.0.0", previous="m-1.0.0", staged="m-4.0.0")
    assert slots.gc(rec) == ["m-3.0.0"]
    assert slots.installed() == ["m-1.0.0", "m-2.0.0", "m-4.0.0"]
    assert list(slots.downloads.iterdir()) == [] and not (slots.root / ".tmp-m-5.0.0-x").exists()


@pytest.mark.integration
def test_opening_a_damaged_slot_is_bundle_error(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    (slots.root / "m-1.0.0").mkdir()
    assert not slots.has("m-1.0.0")
    with pytest.raises(BundleError, match="missing or damaged"):
        slots.open("m-1.0.0")
