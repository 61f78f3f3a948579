"""Swarm pieces that need no broker: profiles, spec checks, scenario registry, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.errors import FleetMisuseError
from simulators.report import render_html, svg_line_chart, to_json, write_json
from simulators.scenarios import (
    REGISTRY,
    Recorder,
    Scenario,
    ScenarioContext,
    Verdict,
    get_scenarios,
    run_scenario,
)
from simulators.swarm import Swarm, make_profiles
from simulators.swarm_device import DeviceProfile
from simulators.swarm_records import SwarmSpec


@pytest.mark.unit
def test_swarm_refuses_bad_specs(tmp_path: Path) -> None:
    spec = SwarmSpec("127.0.0.1", 1, "x", tmp_path / "root.json", tmp_path)
    with pytest.raises(FleetMisuseError):
        Swarm(spec, [])
    with pytest.raises(FleetMisuseError):
        Swarm(spec, [DeviceProfile("a"), DeviceProfile("a")])
    assert len(Swarm(spec, make_profiles(5), processes=8).workers) == 5  # never more workers than devices


@pytest.mark.unit
def test_profiles_are_heterogeneous_in_the_shares_asked() -> None:
    profiles = make_profiles(12, onnx_only_share=0.25, low_memory_share=0.5, old_agent_share=1 / 3)
    assert sum(p.runtimes == ("onnx",) for p in profiles) == 3
    assert sum(p.memory_mb < 512 for p in profiles) == 6
    assert sum(p.agent_version == "0.0.9" for p in profiles) == 4
    assert {p.cohort for p in profiles} == {"eu", "us"}
    assert len({p.device_id for p in profiles}) == 12


@pytest.mark.unit
def test_registry_is_in_plan_order_and_refuses_unknown_names() -> None:
    names = [s.name for s in get_scenarios()]
    assert names[:6] == ["canary_rollout", "bad_model_abort", "drift_alert", "offline_and_broker_restart",
                         "attacker_refused", "ab_experiment"]
    assert [s.number for s in get_scenarios(max_number=3)] == [1, 2, 3]
    with pytest.raises(FleetMisuseError, match="unknown scenario"):
        get_scenarios(["nope"])
    assert set(REGISTRY) >= set(names)


@pytest.mark.unit
def test_a_raising_scenario_is_a_failed_verdict_with_its_series(tmp_path: Path) -> None:
    def boom(ctx: ScenarioContext) -> Verdict:
        ctx.recorder.point("p", "s", 1.0)
        raise RuntimeError("broker on fire")

    ctx = ScenarioContext("127.0.0.1", 1, tmp_path, recorder=Recorder())
    v = run_scenario(Scenario(99, "boom", "raises", boom), ctx)
    assert not v.passed and "broker on fire" in v.details
    assert v.series["p"]["s"][0][1] == 1.0


@pytest.mark.unit
def test_reports_json_html_and_svg(tmp_path: Path) -> None:
    series = {"progress": {"v1": [(0.0, 0.0), (1.0, 4.0)], "v2": [(0.5, 2.0)]}}
    ok = Verdict("a", True, "fine", {"x": 1.5}, series)
    bad = Verdict("b", False, "broken <tag>", {})
    doc = to_json([ok, bad], 3.0)
    assert doc["passed"] is False and [s["name"] for s in doc["scenarios"]] == ["a", "b"]
    assert doc["scenarios"][0]["series"]["progress"]["v1"] == [[0.0, 0.0], [1.0, 4.0]]
    path = tmp_path / "r.json"
    write_json(path, [ok], 1.0, {"devices": 3})
    assert json.loads(path.read_text())["devices"] == 3
    svg = svg_line_chart("progress", ok.series["progress"])
    assert svg.startswith("<svg") and "<polyline" in svg and "<circle" in svg and ">v2<" in svg
    assert "no data" in svg_line_chart("empty", {})
    page = render_html([ok, bad], 3.0, ["note"])
    assert "broken &lt;tag&gt;" in page and page.count("<svg") == 1 and "FAIL" in page


@pytest.mark.unit
def test_large_swarms_get_a_worker_per_200_devices_and_small_ones_one_per_core() -> None:
    import os

    from simulators.swarm import DEVICES_PER_WORKER, auto_processes

    cores = os.cpu_count() or 1
    assert auto_processes(1) == cores
    assert auto_processes(1000) == max(cores, 1000 // DEVICES_PER_WORKER)
    assert auto_processes(DEVICES_PER_WORKER * 40 + 1) == max(cores, 41)


@pytest.mark.unit
def test_one_shared_ticker_ticks_every_ready_device_in_turn_and_stops() -> None:
    import threading
    import time
    from types import SimpleNamespace

    from simulators.swarm_device import SharedTicker

    class Dev(SimpleNamespace):
        def tick(self) -> None:
            self.ticks += 1

    def dev(ready: bool) -> Dev:
        d = Dev(config=SimpleNamespace(report_interval_s=0.02), ready=threading.Event(),
                stop_event=threading.Event(), ticks=0)
        if ready:
            d.ready.set()
        return d

    devs = [dev(True), dev(True), dev(False)]
    ticker = SharedTicker(devs, resolution_s=0.01)  # type: ignore[arg-type]
    thread = threading.Thread(target=ticker.run)
    thread.start()
    deadline = time.monotonic() + 30
    while min(devs[0].ticks, devs[1].ticks) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    devs[1].stop_event.set()  # a stopping device is no longer ticked
    time.sleep(0.05)  # (a tick already under way finishes)
    stopped_at = devs[1].ticks
    time.sleep(0.2)
    ticker.stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert devs[0].ticks >= 5 and devs[1].ticks == stopped_at >= 5
    assert devs[2].ticks == 0  # not ready (still starting): never ticked
