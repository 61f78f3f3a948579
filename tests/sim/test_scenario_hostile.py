"""Scenario 9 (`full_disk_and_clock_skew`) end to end on the private Mosquitto, and its refusal
when no tmpfs can be mounted."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.scenarios import Recorder, ScenarioContext, get_scenarios, run_scenario
from tests.support.broker import Broker

pytestmark = pytest.mark.integration


@pytest.mark.slow  # a whole scenario: in CI's long-test step
def test_full_disk_and_clock_skew_on_eight_devices(mosquitto: Broker, tmp_path: Path) -> None:
    (scenario,) = get_scenarios(["full_disk_and_clock_skew"])
    assert scenario.number == 9
    ctx = ScenarioContext(
        mosquitto.host, mosquitto.port, tmp_path, devices=8, processes=2, recorder=Recorder()
    )
    v = run_scenario(scenario, ctx)
    assert v.passed, v.details
    # 2 devices on a tiny disk and 1 clock 8 days ahead failed v2; 5 (exact, +-5 min, -8 days) committed
    assert (v.metrics["disk_full_devices"], v.metrics["v2_failed"], v.metrics["v2_succeeded"]) == (2, 3, 5)
    assert v.metrics["v2_bundle_bytes"] > v.metrics["disk_free_before_v2_bytes"]  # does not fit even once
    assert "disk full: mlp-2.0.0 needs" in v.details and "expired at" in v.details
    assert "v2 rollout" in v.series  # the rollout's progress was recorded for the report


def test_without_mount_the_scenario_refuses_plainly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # `mount` cannot be found
    (scenario,) = get_scenarios(["full_disk_and_clock_skew"])
    v = run_scenario(scenario, ScenarioContext("127.0.0.1", 1, tmp_path, devices=8, recorder=Recorder()))
    assert not v.passed
    assert v.details.startswith("refused: the full disk is a size-limited tmpfs"), v.details
