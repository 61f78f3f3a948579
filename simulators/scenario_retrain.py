"""Scenario 10: a drifted cohort loses accuracy, the fleet retrains on its data, the canary recovers it.

The whole loop is the fleet's own (`fleet serve` in this process, `simulators.sim_service`):
the devices of both cohorts serve v1 (an MLP fitted on undrifted reference data by
`simulators.trainer`); the ground truth is the data generator's (`simulators.trainer.
oracle_labels`, the truth MLP the swarm scores every served batch against). Then cohort `eu`
drifts (a -2 std mean shift on twenty features): its accuracy falls; the drift monitor's
`retrain` trigger fires after `PERSIST_WINDOWS` windows; the training worker starts a job for the
trigger's cohort, which starts a **collection** (a signed policy in the `eu` devices' director
documents); the agents sample what they serve and upload it in chunks; the fleet assembles
dataset versions; the job labels them (the oracle stands in for a labelling step), fine-tunes
the parent with the shipped trainer in a subprocess, builds the bundle, gates its accuracy
against the parent on a holdout with collected rows, registers 1.0.1 with its lineage and starts
the canary on `cohort=eu` (policy `automatic`). Passed when the canary completes on every `eu`
device, `eu`'s accuracy recovers above what the unretrained model scores on the drifted data
in the same run, and every `us` device stays on 1.0.0.

Figures: `trigger_to_canary_s` (the trigger's alert to the canary rollout's creation) and
`retrain_accuracy_gain` (eu accuracy on 1.0.1 minus eu accuracy on 1.0.0 after the drift).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.settings import TelemetrySettings
from fleet.training.policy import TrainingPolicy, TrainingSettings
from simulators.datagen import DataGenerator, DriftSpec, default_schema
from simulators.scenario_world import ServiceWorld, failures, service_world
from simulators.scenarios import ScenarioContext, Verdict, register
from simulators.sim_fleet import MODEL_NAME, SIM_HEALTH
from simulators.trainer import oracle_labels

WINDOW_S = 4.0
TELEMETRY_INTERVAL_S = 1.0
TRAFFIC_INTERVAL_S = 0.5
ROWS_PER_WINDOW = 2400  # per cohort: above the drift tests' small-sample limit (1,000)
PERSIST_WINDOWS = 2
DRIFT_COHORT, OTHER_COHORT = "eu", "us"
DRIFTED = [f"f{j:02d}" for j in range(20)]
TRUTH_SEED = 1
ACCURACY = "accuracy per cohort (ground truth, per served batch)"
MARKS = ACCURACY  # the loop's events as dots on the accuracy chart (at 1.0)
NEW_VERSION = "1.0.1"
SINGLE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def drift_specs() -> list[DriftSpec]:
    return [DriftSpec(f, "mean_shift", amount=-2.0, cohorts=frozenset({DRIFT_COHORT})) for f in DRIFTED]


def _first_version(ctx: ScenarioContext, import_dir: Path, training_dir: Path) -> tuple[Path, Path]:
    """Reference data (x, oracle labels: rows v1 was not fitted on, as a validation set is) and
    the v1 bundle: an MLP fitted on other rows of the same distribution, in a subprocess
    (single-threaded BLAS: two cores shared with the swarm)."""
    schema = default_schema()
    training_dir.mkdir(parents=True, exist_ok=True)
    import_dir.mkdir(parents=True, exist_ok=True)
    fitted = DataGenerator(schema, seed=10).batch(2000).astype(np.float32)  # v1's training rows
    first = training_dir / "v1-train.npz"
    np.savez(first, x=fitted, y=oracle_labels(fitted))
    x = DataGenerator(schema, seed=11).batch(2000).astype(np.float32)  # rows v1 never saw
    reference = training_dir / "reference.npz"
    np.savez(reference, x=x, y=oracle_labels(x))
    model = import_dir / f"{MODEL_NAME}-1.0.0.onnx"
    env = {**os.environ, **SINGLE_THREAD, "EDGEFLEET_SIM_TRUTH_SEED": str(TRUTH_SEED)}
    done = subprocess.run([sys.executable, "-m", "simulators.trainer", "pretrain", str(first), str(model),
                           "200"], env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"fitting v1 failed: {done.stderr[-500:]}")
    hold = DataGenerator(schema, seed=12).batch(1000).astype(np.float32)
    meta = BundleMetadata.model_validate({
        "name": MODEL_NAME, "version": "1.0.0", "feature_names": schema.names,
        "categorical": schema.categorical_vocabulary(), "bins": 50, "golden_count": 8, "health": SIM_HEALTH,
        "lineage": {"training_code_ref": "simulators.trainer:pretrain"}})
    bundle = build_bundle(model, meta, import_dir / f"{MODEL_NAME}-1.0.0.efb", reference_data=x,
                          holdout_data=hold, holdout_labels=oracle_labels(hold))
    return reference, bundle


def training_policy(reference: Path, devices_per_cohort: int) -> TrainingPolicy:
    return TrainingPolicy.model_validate({
        "model": MODEL_NAME, "reference_data": str(reference), "labeler": "simulators.trainer:oracle_labels",
        "collect": {"max_rows": 300, "max_seconds": 4, "chunk_bytes": 64 * 1024},
        "min_rows": max(300, 200 * devices_per_cohort), "data_timeout_s": 120,
        "trainer": {"entry_point": "simulators.trainer:train", "timeout_s": 180,
                    "env": {**SINGLE_THREAD, "EDGEFLEET_SIM_TRAIN_STEPS": "150",
                            "EDGEFLEET_SIM_TRUTH_SEED": str(TRUTH_SEED)}},
        "gate": {"min_gain_collected": 0.02, "max_reference_drop": 0.05},
        "rollout": "automatic", "selector": "cohort={cohort}",
        "strategy": {"kind": "canary", "stages": [50, 100], "bake_s": 1.0, "on_breach": "pause"},
        # the canary's cohort is known to have drifted from v1's reference: the drift gate would
        # hold back the very fix, so it is off; install failures and error rate still gate it
        "thresholds": {"max_drift_score": 1.0},
    })


class AccuracyProbe:
    """Samples the swarm's per-cohort ground-truth accuracy once a second into the recorder and
    into phase buckets (`phase` is set by the scenario as the loop advances)."""

    def __init__(self, w: ServiceWorld, t0: float) -> None:
        self.w, self.t0 = w, t0
        self.phase = "baseline"
        self.buckets: dict[tuple[str, str, str], list[float]] = {}  # (phase, cohort, bundle) -> batches
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="accuracy-probe", daemon=True)

    def __enter__(self) -> AccuracyProbe:
        self.w.swarm.take_quality(by_cohort=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        got = self.w.swarm.take_quality(by_cohort=True)
        t = time.monotonic() - self.t0
        per_cohort: dict[str, list[float]] = {}
        for key, values in got.items():
            cohort, _, bundle = key.partition("/")
            self.buckets.setdefault((self.phase, cohort, bundle), []).extend(values)
            per_cohort.setdefault(cohort, []).extend(values)
        for cohort, values in sorted(per_cohort.items()):
            if values:
                self.w.ctx.recorder.point_at(ACCURACY, cohort, t, float(np.mean(values)))

    def mean(self, phase: str, cohort: str, bundle: str) -> float:
        values = self.buckets.get((phase, cohort, bundle), [])
        return float(np.mean(values)) if values else math.nan

    def mark(self, what: str) -> float:
        t = time.monotonic() - self.t0
        self.w.ctx.recorder.point_at(MARKS, what, t, 1.0)
        return t


def _jobs(w: ServiceWorld) -> list[dict[str, Any]]:
    return list(w.fleet.api_call("GET", "/v1/training/jobs", params={"limit": 50})["items"])


def _wait_job(w: ServiceWorld, probe: AccuracyProbe, timeout: float) -> dict[str, Any] | None:
    """The first job, once it has a rollout (or ended); marks the trigger and collection on the way."""
    deadline = time.monotonic() + timeout
    marked: set[str] = set()
    while time.monotonic() < deadline:
        w.swarm.check_alive()
        jobs = _jobs(w)
        for job in jobs:
            for state in ("waiting_data", "training", "building"):
                if job["state"] == state and state not in marked:
                    marked.add(state)
                    probe.mark({"waiting_data": "trigger, collect", "training": "training",
                                "building": "gate, bundle"}[state])
                    w.ctx.progress(f"training job {job['state']}: {job['step']}", None, None)
            if job["rollout_id"] or job["state"] in ("failed", "cancelled", "rejected"):
                return job
        time.sleep(0.5)
    jobs = _jobs(w)
    return jobs[0] if jobs else None


@register(10, "retrain_loop", "a drifted cohort's accuracy falls, the fleet retrains on its data, the canary "
          "recovers it")
def retrain_loop(ctx: ScenarioContext) -> Verdict:
    per_cohort = max(1, ctx.devices // 2)
    batch = math.ceil(ROWS_PER_WINDOW / (per_cohort * WINDOW_S / TRAFFIC_INTERVAL_S))
    fleet_dir = ctx.data_dir / "fleet"
    ctx.progress("fitting v1 on the reference data", None, None)
    reference, bundle = _first_version(ctx, fleet_dir / "imports", fleet_dir / "training-input")
    telemetry = TelemetrySettings(evaluate_interval_s=1.0, settle_s=2 * TELEMETRY_INTERVAL_S, lookback_s=600,
                                  persist_windows=PERSIST_WINDOWS, clear_windows=2)
    training = TrainingSettings(tick_s=0.5, policies=(training_policy(reference, per_cohort),))
    spec = {"truth_seed": TRUTH_SEED, "traffic_batch": batch, "traffic_interval_s": TRAFFIC_INTERVAL_S,
            "telemetry_interval_s": TELEMETRY_INTERVAL_S}
    fleet_kwargs = {"window_s": WINDOW_S, "telemetry": telemetry, "training": training}
    with service_world(ctx, prefix="r10", spec_kwargs=spec, fleet_kwargs=fleet_kwargs) as w:
        f = w.fleet
        f.api_call("POST", f"/v1/models/{MODEL_NAME}/versions/from-bundle", expect=(201,),
                   json={"path": bundle.name})
        rid = f.rollout("1.0.0", {"kind": "all_at_once", "bake_s": 0})
        st = w.wait_rollout(rid, ("completed", "aborted", "failed", "cancelled"), 120, "provisioning")
        provisioned = st["state"] == "completed" and w.wait(lambda: w.all_serving(f"{MODEL_NAME}-1.0.0"), 30)
        eu = [p.device_id for p in w.swarm.profiles if p.cohort == DRIFT_COHORT]
        us = [p.device_id for p in w.swarm.profiles if p.cohort != DRIFT_COHORT]
        t0 = time.monotonic()
        with AccuracyProbe(w, t0) as probe:
            time.sleep(WINDOW_S * 2)
            probe.sample()
            probe.phase = "drifted"
            w.swarm.set_drift(drift_specs())
            probe.mark("drift (eu)")
            drift_at = time.time()
            job = _wait_job(w, probe, 240)
            canary: dict[str, Any] = {}
            serving_new = False
            if job is not None and job.get("rollout_id"):
                probe.mark("canary start")
                probe.sample()
                probe.phase = "canary"
                canary = w.wait_rollout(job["rollout_id"], ("completed", "aborted", "failed", "cancelled"),
                                        180, "canary rollout of the retrained version (devices by status)")
                new_id = f"{MODEL_NAME}-{NEW_VERSION}"
                serving_new = w.wait(lambda: f.serving(eu).get(new_id, 0) == len(eu), 30)
                probe.mark("canary done")
                probe.sample()
                probe.phase = "retrained"
                time.sleep(WINDOW_S * 1.5)
                probe.sample()
        return _verdict(w, probe, job, canary, provisioned, serving_new, eu, us, drift_at)


def _verdict(w: ServiceWorld, probe: AccuracyProbe, job: dict[str, Any] | None, canary: dict[str, Any],
             provisioned: bool, serving_new: bool, eu: list[str], us: list[str], drift_at: float) -> Verdict:
    f = w.fleet
    old, new = f"{MODEL_NAME}-1.0.0", f"{MODEL_NAME}-{NEW_VERSION}"
    before = probe.mean("baseline", DRIFT_COHORT, old)
    drifted = probe.mean("drifted", DRIFT_COHORT, old)  # the baseline: the unretrained model, drifted data
    retrained = probe.mean("retrained", DRIFT_COHORT, new)
    us_after = probe.mean("retrained", OTHER_COHORT, old)
    lineage: dict[str, Any] = {}
    trigger: dict[str, Any] = {}
    rollout: dict[str, Any] = {}
    if job is not None and job.get("result_version"):
        lineage = f.api_call("GET", f"/v1/models/{MODEL_NAME}/versions/{job['result_version']}")["lineage"]
    if job is not None and job.get("trigger_alert_id") is not None:
        alerts = f.api_call("GET", "/v1/alerts", params={"kind": "retrain", "limit": 50})["items"]
        trigger = next((a for a in alerts if a["id"] == job["trigger_alert_id"]), {})
    if job is not None and job.get("rollout_id"):
        rollout = f.api_call("GET", f"/v1/rollouts/{job['rollout_id']}")
    jobs = _jobs(w)
    us_serving = f.serving(us)
    src = lineage.get("source", {})
    datasets = list(job.get("dataset_ids", [])) if job else []
    problems = failures([
        (provisioned, "v1 not installed everywhere"),
        (drifted < before - 0.05, f"eu accuracy did not fall with the drift ({before:.3f} -> {drifted:.3f})"),
        (job is not None, "no training job was started"),
        (job is None or job["state"] == "succeeded",
         f"job ended {job and job['state']}: {job and job['error']}"),
        (bool(trigger) and trigger.get("cohort") == DRIFT_COHORT,
         f"the job's trigger {trigger or 'missing'}"),
        (len(jobs) == 1, f"{len(jobs)} training jobs (want 1: the other cohort did not drift)"),
        (bool(datasets) and all(any(f"-{d}-" in ds for d in eu) for ds in datasets),
         f"trained on datasets {datasets} (want eu devices' only)"),
        (src.get("trigger_alert_id") == (job or {}).get("trigger_alert_id")
         and src.get("dataset_ids") == datasets and src.get("parent_version") == f"{MODEL_NAME}:1.0.0",
         f"lineage {src}"),
        (rollout.get("selector") == f"cohort={DRIFT_COHORT}", f"canary selector {rollout.get('selector')}"),
        (canary.get("state") == "completed",
         f"canary ended {canary.get('state')}: {canary.get('devices_by_status')}"),
        (serving_new, f"eu serving {dict(f.serving(eu))}"),
        (us_serving.get(old, 0) == len(us), f"us serving {dict(us_serving)} (want all on {old})"),
        (retrained > drifted,
         f"eu accuracy did not recover: {drifted:.3f} drifted, {retrained:.3f} retrained"),
    ])
    metrics: dict[str, float] = {
        "devices": float(len(w.ids)),
        "accuracy_eu_before_drift": before,
        "accuracy_eu_drifted_unretrained": drifted,
        "accuracy_eu_retrained": retrained,
        "accuracy_us": us_after,
        "retrain_accuracy_gain": retrained - drifted,
        "datasets": float(len(datasets)),
    }
    if trigger and rollout:
        metrics["trigger_to_canary_s"] = _epoch(rollout["created_at"]) - float(trigger["created_at"])
        metrics["drift_to_trigger_s"] = float(trigger["created_at"]) - drift_at
    if job is not None:
        metrics.update(step_durations(job["history"]))
        for k in ("gate_new_collected", "gate_parent_collected", "gate_new_reference",
                  "gate_parent_reference"):
            if k in job["metrics"]:
                metrics[k] = float(job["metrics"][k])
    details = (f"eu accuracy {before:.3f} -> {drifted:.3f} after the drift -> {retrained:.3f} on the "
               f"retrained {NEW_VERSION} (gain {retrained - drifted:+.3f}); trigger to canary "
               f"{metrics.get('trigger_to_canary_s', math.nan):.1f} s; us stayed on 1.0.0"
               if not problems else "; ".join(problems))
    return Verdict("retrain_loop", not problems, details, metrics,
                   x_labels={ACCURACY: "seconds since the baseline began (dots: the loop's events)"})


def step_durations(history: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds the job spent in each state, from its history: `job_<state>_s`."""
    out: dict[str, float] = {}
    entered = [(float(h["at"]), str(h["state"])) for h in history if "state" in h]
    for (at, state), (nxt, _) in itertools.pairwise(entered):
        out[f"job_{state}_s"] = out.get(f"job_{state}_s", 0.0) + nxt - at
    return out


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
