"""Scenario 1 at scale: a canary rollout (10/50/100 %) of an int8 model to 1,000 real agents.

Each device is the real agent daemon (TUF, director checks, MQTT fetcher, two-slot
lifecycle, golden vectors, probation) in a swarm of worker processes (one per core, and one
per 200 devices at this scale: five on two cores; one selector loop each) against a private
Mosquitto and the real fleet service (API, publisher, rollout controller over SQLite).
Inference traffic is off so that the figures are the rollout's own, and devices send
telemetry at the agent's default interval (60 s; the demo uses 2 s). Baseline in the same
run: the same scenario with 20 devices.

Metrics: `swarm_devices`; `swarm_connect_s` (every device connected, from the workers'
start); `swarm_rss_mb_per_device` (workers' RSS above their RSS before the first device,
per device: agent objects, sockets, threads, SQLite queues; the model session is shared);
`rollout_to_100pct_s` (rollout created -> completed with every device committed);
`swarm_passed` (1 when the scenario's checks held); the `_baseline20` twins.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

NAME = "swarm"
DESCRIPTION = "canary rollout to 1,000 real agents in a swarm (vs 20 agents)"

DEVICES = 1000
BASELINE_DEVICES = 20
# The agent's default (`AgentConfig.telemetry_interval_s`); the demo's swarm reports every 2 s
# so that drift shows within seconds, which at 1,000 devices is 500 reports a second.
TELEMETRY_INTERVAL_S = 60.0


def _run(devices: int, work: Path) -> dict[str, float]:
    from simulators.broker import ManagedBroker
    from simulators.scenario_rollout import canary_rollout
    from simulators.scenarios import REGISTRY, ScenarioContext, run_scenario

    with ManagedBroker(work / "broker") as broker:
        ctx = ScenarioContext(
            broker.host,
            broker.port,
            work / "data",
            devices=devices,
            processes=0,  # one per core, one per 200 devices at scale (`swarm.auto_processes`)
            options={"spec": {"traffic": False, "start_timeout_s": 600.0,
                              "telemetry_interval_s": TELEMETRY_INTERVAL_S}},
        )
        ctx.data_dir.mkdir(parents=True)
        verdict = run_scenario(REGISTRY[canary_rollout.__name__], ctx)
    m = verdict.metrics
    return {
        "swarm_devices": float(devices),
        "swarm_connect_s": m.get("connect_s", float("nan")),
        "swarm_rss_mb_per_device": m.get("rss_mb_per_device", float("nan")),
        "rollout_to_100pct_s": m.get("rollout_to_100pct_s", float("nan")),
        "swarm_passed": 1.0 if verdict.passed else 0.0,
    }


def run() -> dict[str, float]:
    out: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    try:
        base = _run(BASELINE_DEVICES, work / "base")
        out.update({f"{k}_baseline20": v for k, v in base.items()})
        out.update(_run(DEVICES, work / "full"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
