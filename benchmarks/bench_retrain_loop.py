"""Scenario 10 (`retrain_loop`) as a benchmark: from a drifted cohort's retraining trigger to the
canary of the retrained version, and the accuracy the retraining recovered.

The scenario runs whole (`simulators/scenario_retrain.py`): real agents in a swarm against a
private Mosquitto and the fleet service in this process (drift monitor, training worker,
collection driver, dataset ingest, rollout controller over SQLite); the ground truth is the
data generator's truth MLP. Baselines in the same run: for the accuracy, the unretrained v1 on
the drifted cohort's data (`retrain_accuracy_drifted`, the same batches' ground truth); for the
time, the job's own steps from its history (the collection wait, the trainer subprocess, the
bundle pipeline and gate, the registration), so the orchestration's share of
`trigger_to_canary_s` is visible.

Metrics: `trigger_to_canary_s` (the trigger alert's creation to the canary rollout's),
`retrain_accuracy_gain` (eu accuracy on the retrained version minus on v1 after the drift),
`retrain_accuracy_before_drift`, `retrain_accuracy_drifted`, `retrain_accuracy_retrained`,
`retrain_accuracy_other_cohort` (us, never retrained), `retrain_drift_to_trigger_s`,
`retrain_job_<state>_s`, `retrain_gate_new_collected` / `_parent_collected` (the gate's holdout
figures), `retrain_passed`. `EDGEFLEET_BENCH_RETRAIN_DEVICES` (default 10) sets the swarm size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from simulators.broker import ManagedBroker
from simulators.scenario_retrain import retrain_loop
from simulators.scenarios import REGISTRY, ScenarioContext, run_scenario

NAME = "retrain_loop"
DESCRIPTION = "trigger to canary of a retrained version, accuracy recovered (vs the unretrained model)"


def run() -> dict[str, float]:
    devices = int(os.environ.get("EDGEFLEET_BENCH_RETRAIN_DEVICES", "10"))
    work = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    try:
        with ManagedBroker(work / "broker") as broker:
            ctx = ScenarioContext(broker.host, broker.port, work / "data", devices=devices, processes=1)
            ctx.data_dir.mkdir(parents=True)
            verdict = run_scenario(REGISTRY[retrain_loop.__name__], ctx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = verdict.metrics
    nan = float("nan")
    out = {
        "trigger_to_canary_s": m.get("trigger_to_canary_s", nan),
        "retrain_accuracy_gain": m.get("retrain_accuracy_gain", nan),
        "retrain_accuracy_before_drift": m.get("accuracy_eu_before_drift", nan),
        "retrain_accuracy_drifted": m.get("accuracy_eu_drifted_unretrained", nan),
        "retrain_accuracy_retrained": m.get("accuracy_eu_retrained", nan),
        "retrain_accuracy_other_cohort": m.get("accuracy_us", nan),
        "retrain_drift_to_trigger_s": m.get("drift_to_trigger_s", nan),
        "retrain_gate_new_collected": m.get("gate_new_collected", nan),
        "retrain_gate_parent_collected": m.get("gate_parent_collected", nan),
        "retrain_devices": float(devices),
        "retrain_passed": 1.0 if verdict.passed else 0.0,
    }
    out.update({f"retrain_{k}": v for k, v in m.items() if k.startswith("job_")})
    return out
