"""The fault drill on real processes: two ingest workers and two controllers (`fleet serve
--role ...`) share one SQLite file (WAL) and a Mosquitto; 200 load devices follow a canary
10/50/100 %; the leading controller is killed with SIGKILL once the 50 % stage runs. The standby
takes the lease, the rollout completes, every device commits the new bundle exactly once, no
progress row is lost, and the audit log names the hand-over."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.load_devices.scale_run import ScaleConfig, run_scale
from tests.support.broker import Broker


@pytest.mark.integration
@pytest.mark.slow
def test_killing_the_leader_mid_rollout_loses_and_repeats_nothing(mosquitto: Broker, tmp_path: Path) -> None:
    result = run_scale(ScaleConfig(devices=200, install_s=1.0, leader_ttl_s=2.0, timeout_s=400), tmp_path,
                       mosquitto.host, mosquitto.port)
    assert result.problems == [] and result.passed
    assert result.devices_lost == 0 and result.committed_twice == 0
    assert result.failover_s is not None
    assert len(result.handovers) == 2 and result.handovers[0][0] is None  # the first leader, then the standby
    assert result.handovers[1][0] == result.handovers[0][1]  # the hand-over names the killed holder
