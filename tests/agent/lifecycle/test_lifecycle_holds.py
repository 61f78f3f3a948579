"""Holds on the device: maintenance windows and resource shortfalls, with an injected clock and probe.

Real bundles, a real TUF repository and onnxruntime (tests/support/lifecycle_world.py); only
the clock and the resource probe are the test's, so a window that opens in two minutes opens
in two minutes of simulated time, and a device "low on memory" is a probe reading.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.contract.director import DirectorDocument, TargetRef
from agent.contract.windows import UpdateWindows, Window, is_open, next_opening, zone
from agent.lifecycle import DesiredTarget, Lifecycle, LifecycleConfig, State, StateRecord
from agent.lifecycle.resources import ResourcePolicy, Resources, shortfall
from agent.serving.model_holder import ModelHolder
from tests.support.fakes import FakeClock
from tests.support.lifecycle_world import Repo, make_repo

BERLIN = zone("Europe/Berlin")
#: 01:58 in Berlin: the 02:00 activation window opens in two minutes
BEFORE_TWO = datetime(2026, 12, 3, 1, 58, tzinfo=BERLIN).timestamp()
ACTIVATE_AT_TWO = {"activation": {"cron": "0 2 * * *", "duration_s": 3600}, "tz": "Europe/Berlin"}
PLENTY = Resources(free_disk_bytes=10 << 30, free_memory_mb=8192.0, load_per_cpu=0.1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    r = make_repo(tmp_path_factory.mktemp("repo"))
    r.publish("1.0.0", model_seed=0)
    r.publish("2.0.0", model_seed=1)
    return r


class Probe:
    """The device's free resources as the test sets them."""

    def __init__(self) -> None:
        self.free = PLENTY

    def __call__(self, path: Path) -> Resources:
        return self.free


Events = list[tuple[str, Any]]


def _device(repo: Repo, root: Path, clock: FakeClock, probe: Probe) -> tuple[Lifecycle, Events]:
    events: Events = []
    cfg = LifecycleConfig(state_dir=root / "state", load_timeout_s=5.0, probation_poll_s=0.002,
                          resources=ResourcePolicy(memory_margin_mb=64, hold_base_s=30, hold_max_s=120))
    lc = Lifecycle(cfg, ModelHolder(drain_timeout_s=2.0), repo.trust(root),
                   lambda n, f: events.append((n, f)), clock=clock)
    lc.ctx.probe = probe
    return lc, events


def _on_v1(repo: Repo, tmp_path: Path, clock: FakeClock, probe: Probe) -> tuple[Lifecycle, Events]:
    lc, events = _device(repo, tmp_path / "dev", clock, probe)
    lc.offer_desired(repo.desired("mlp-1.0.0"))
    assert lc.start() is State.IDLE and lc.record.active == "mlp-1.0.0"
    events.clear()
    return lc, events


def _with_windows(target: DesiredTarget, windows: dict[str, Any]) -> DesiredTarget:
    return replace(target, windows=windows)


@pytest.mark.unit
def test_windows_open_and_close_in_the_devices_zone_across_dst() -> None:
    w = Window(cron="0 2 * * *", duration_s=7200)
    assert not is_open(w, BERLIN, BEFORE_TWO) and next_opening(w, BERLIN, BEFORE_TWO) == BEFORE_TWO + 120
    assert is_open(w, BERLIN, BEFORE_TWO + 120) and is_open(w, BERLIN, BEFORE_TWO + 120 + 7199)
    assert not is_open(w, BERLIN, BEFORE_TWO + 120 + 7200)
    summer = datetime(2026, 7, 1, 1, 59, tzinfo=BERLIN).timestamp()  # UTC+2: still 02:00 local
    assert next_opening(w, BERLIN, summer) == summer + 60
    assert is_open(None, BERLIN, BEFORE_TWO)
    for bad in ("0 2 * *", "61 * * * *", "0 2 * * * *", "every night"):
        with pytest.raises(ValueError, match="cron"):
            Window(cron=bad.ljust(9), duration_s=60)
    with pytest.raises(ValueError, match="unknown time zone"):
        UpdateWindows(tz="Europe/Atlantis")


@pytest.mark.unit
def test_shortfall_names_the_resource_and_cpu_is_checked_only_when_configured() -> None:
    policy = ResourcePolicy(memory_margin_mb=64)
    assert shortfall(policy, Resources(free_memory_mb=40)) == "low_memory (40 MB free, 64 MB needed)"
    assert shortfall(policy, Resources(free_memory_mb=100), memory_mb=50) == \
        "low_memory (100 MB free, 114 MB needed)"
    assert shortfall(policy, Resources(free_disk_bytes=1 << 20), disk_bytes=1 << 20).startswith("low_disk")
    tiny = Resources(free_disk_bytes=1 << 20, total_disk_bytes=2 << 20)  # never fits: fails, not waits
    assert shortfall(policy, tiny, disk_bytes=1 << 20) is None
    assert shortfall(policy, Resources(load_per_cpu=50.0)) is None
    assert shortfall(replace(policy, max_load_per_cpu=2.0), Resources(load_per_cpu=3.0)) == \
        "high_cpu (load 3.00 per CPU, limit 2)"
    assert shortfall(policy, Resources()) is None  # unknown is never a reason to hold


@pytest.mark.unit
def test_windows_travel_from_the_signed_document_into_the_state_record() -> None:
    ref = TargetRef(path="models/mlp/mlp-2.0.0.efb", length=10, sha256="a" * 64, name="mlp", version="2.0.0")
    now = datetime(2026, 12, 3, tzinfo=UTC)
    doc = DirectorDocument(device_id="d1", sequence=3, issued_at=now, expires=now.replace(day=4), target=ref,
                           windows=UpdateWindows.model_validate(ACTIVATE_AT_TWO))
    target = DesiredTarget.from_director(doc)
    assert target.windows == ACTIVATE_AT_TWO
    record = StateRecord(desired=target)
    assert StateRecord.from_json(record.to_json()).desired == target
    assert "windows" not in DirectorDocument(device_id="d1", sequence=3, issued_at=now, expires=now.replace(
        day=4), target=ref).to_signed_dict()  # documents without windows stay as older agents know them


@pytest.mark.integration
def test_a_window_that_opens_in_two_minutes_of_simulated_time(repo: Repo, tmp_path: Path) -> None:
    clock, probe = FakeClock(BEFORE_TWO), Probe()
    lc, events = _on_v1(repo, tmp_path, clock, probe)
    lc.offer_desired(_with_windows(repo.desired("mlp-2.0.0"), ACTIVATE_AT_TWO))
    assert lc.run_until_stable() is State.STAGED  # prefetched and verified, then it rests
    rec = lc.record
    assert (rec.active, rec.staged, rec.hold) == ("mlp-1.0.0", "mlp-2.0.0", "waiting_for_window")
    assert rec.retry_at == BEFORE_TWO + 120
    assert [n for n, _ in events].count("update_held") == 1
    clock.advance(60)
    assert lc.run_until_stable() is State.STAGED and lc.record.active == "mlp-1.0.0"
    assert rec.attempts.get("staged:mlp-2.0.0") == 1  # resting is one entry, never a loop
    assert [n for n, _ in events].count("update_held") == 1  # said once
    clock.advance(60)
    assert lc.run_until_stable() is State.IDLE
    assert (lc.record.active, lc.record.hold) == ("mlp-2.0.0", None)
    names = [n for n, _ in events]
    assert names.index("update_resumed") < names.index("activated") < names.index("committed")


@pytest.mark.integration
def test_a_closed_download_window_holds_before_any_byte_and_a_restart_keeps_resting(
        repo: Repo, tmp_path: Path) -> None:
    clock, probe = FakeClock(BEFORE_TWO), Probe()
    lc, events = _on_v1(repo, tmp_path, clock, probe)
    windows = {**ACTIVATE_AT_TWO, "download": {"cron": "0 2 * * *", "duration_s": 600}}
    lc.offer_desired(_with_windows(repo.desired("mlp-2.0.0"), windows))
    assert lc.run_until_stable() is State.IDLE
    assert (lc.record.hold, lc.record.candidate) == ("waiting_for_window", None)
    assert not lc.ctx.slots.has("mlp-2.0.0") and "update_started" not in [n for n, _ in events]
    # the agent restarts while it waits: nothing was in flight, so nothing is "recovered"
    again, _ = _device(repo, tmp_path / "dev", clock, probe)
    assert again.start() is State.IDLE and again.record.crash_recoveries == 0
    clock.advance(120)
    assert again.run_until_stable() is State.IDLE and again.record.active == "mlp-2.0.0"


@pytest.mark.integration
def test_devices_low_on_memory_hold_with_backoff_then_proceed(repo: Repo, tmp_path: Path) -> None:
    clock, probe = FakeClock(), Probe()
    lc, events = _on_v1(repo, tmp_path, clock, probe)
    probe.free = Resources(free_disk_bytes=10 << 30, free_memory_mb=40.0)
    lc.offer_desired(repo.desired("mlp-2.0.0"))
    assert lc.run_until_stable() is State.IDLE
    rec = lc.record
    assert rec.hold == "held: low_memory (40 MB free, 64 MB needed)" and rec.retry_at == clock.now + 30
    clock.advance(31)
    assert lc.run_until_stable() is State.IDLE
    assert rec.holds == 2 and rec.retry_at == clock.now + 60  # backed off
    held = [f for n, f in events if n == "update_held"]
    assert len(held) == 1 and held[0]["reason"].startswith("held: low_memory")
    probe.free = PLENTY  # memory came back
    clock.advance(61)
    assert lc.run_until_stable() is State.IDLE
    assert (rec.active, rec.hold, rec.holds) == ("mlp-2.0.0", None, 0)
    assert "update_resumed" in [n for n, _ in events]


@pytest.mark.integration
def test_memory_short_at_activation_holds_the_staged_bundle(repo: Repo, tmp_path: Path) -> None:
    clock, probe = FakeClock(), Probe()
    lc, _ = _on_v1(repo, tmp_path, clock, probe)
    calls = {"n": 0}

    def short_after_download(path: Path) -> Resources:
        calls["n"] += 1  # the download's check passes, the activation's finds memory gone
        return PLENTY if calls["n"] == 1 else Resources(free_memory_mb=10.0)

    lc.ctx.probe = short_after_download
    lc.offer_desired(repo.desired("mlp-2.0.0"))
    assert lc.run_until_stable() is State.STAGED
    assert lc.record.hold is not None and lc.record.hold.startswith("held: low_memory")
    assert lc.record.active == "mlp-1.0.0"
    lc.ctx.probe = probe
    clock.advance(31)
    assert lc.run_until_stable() is State.IDLE and lc.record.active == "mlp-2.0.0"
