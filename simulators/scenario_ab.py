"""Scenario 6: an A/B experiment through the fleet's experiments API recommends the better version.

Ground truth is a known model (the MLP with seed 1): labels are its argmax. Arm A is the
version every device runs (a different model, seed 2: it agrees with the truth far less
often); arm B is the int8-quantized truth model. The experiment (`POST /v1/experiments`,
split 50 %) is carried out by the fleet's `ExperimentDriver`, which sends each device the
director document of its arm; devices install B or keep A. Every served batch is scored
against the truth on the device side of the simulation, and the per-batch accuracies of
each arm are posted as observations. Passed when both arms are populated, the devices of arm
B really serve B, and the recommendation names B.
"""

from __future__ import annotations

import time
from typing import Any

from agent.contract.telemetry import latency_bucket_upper
from fleet.telemetry.ingest import TelemetryStore
from simulators.scenario_world import ServiceWorld, failures, service_world
from simulators.scenarios import ScenarioContext, Verdict, register
from simulators.sim_fleet import MODEL_NAME

TRUTH_SEED = 1
COLLECT_S = 6.0


@register(6, "ab_experiment", "A/B experiment: the version that agrees with the truth is recommended")
def ab_experiment(ctx: ScenarioContext) -> Verdict:
    with service_world(
        ctx, prefix="r6", spec_kwargs={"truth_seed": TRUTH_SEED, "traffic_interval_s": 0.3}
    ) as w:
        f = w.fleet
        a = f.register_bundle("1.0.0", 2)
        b = f.register_bundle("2.0.0", TRUTH_SEED, quantize="dynamic")
        rid = f.rollout("1.0.0", {"kind": "all_at_once", "bake_s": 0})
        st = w.wait_rollout(rid, ("completed", "aborted", "failed", "cancelled"), 120, "provisioning")
        provisioned = st["state"] == "completed" and w.wait(lambda: w.all_serving(a), 30)
        ex = f.api_call(
            "POST",
            "/v1/experiments",
            expect=(201,),
            json={
                "name": "truth-agreement",
                "version_a": f"{MODEL_NAME}:1.0.0",
                "version_b": f"{MODEL_NAME}:2.0.0",
                "selector": "site=sim",
                "split_b": 0.5,
                "metrics": {"accuracy": "max"},
                "min_samples": 30,
            },
        )
        eid = ex["id"]

        def arms() -> dict[str, int]:
            out: dict[str, int] = f.api_call("GET", f"/v1/experiments/{eid}")["devices"]
            return out

        assigned = w.wait(lambda: sum(arms().values()) == len(w.ids), 60)
        n_b = arms().get("b", 0)
        switched = w.wait(lambda: f.serving(w.ids).get(b, 0) == n_b, 90)
        w.swarm.take_quality()  # drop batches served before the arms settled
        time.sleep(COLLECT_S)
        quality = w.swarm.take_quality()
        posted: dict[str, int] = {}
        for arm, bundle in (("a", a), ("b", b)):
            values = quality.get(bundle, [])[:100_000]
            if values:
                f.api_call(
                    "POST",
                    f"/v1/experiments/{eid}/observations",
                    expect=(202,),
                    json={"arm": arm, "metric": "accuracy", "values": values},
                )
            posted[arm] = len(values)
        rec = f.api_call("GET", f"/v1/experiments/{eid}/recommendation")
        latency_plot = _latency_by_version(w, {"A " + a: "1.0.0", "B " + b: "2.0.0"})
        mean = {
            arm: (sum(v) / len(v) if (v := quality.get(bundle)) else 0.0)
            for arm, bundle in (("a", a), ("b", b))
        }
        problems = failures(
            [
                (provisioned, "provisioning arm A did not complete"),
                (assigned, f"experiment assigned {arms()} of {len(w.ids)} devices"),
                (0 < n_b < len(w.ids), f"arms not both populated: {arms()}"),
                (switched, f"arm B devices serving B: {dict(f.serving(w.ids))}"),
                (rec["verdict"] == "b", f"recommendation {rec['verdict']}: {rec['summary']}"),
            ]
        )
        metric: dict[str, Any] = next((m for m in rec.get("metrics", []) if m["metric"] == "accuracy"), {})
        metrics = {
            "devices": float(len(w.ids)),
            "devices_b": float(n_b),
            "accuracy_a": mean["a"],
            "accuracy_b": mean["b"],
            "samples_a": float(posted.get("a", 0)),
            "samples_b": float(posted.get("b", 0)),
        }
        if metric.get("p_value") is not None:
            metrics["p_value"] = float(metric["p_value"])
        details = (
            f"recommended B ({b}, accuracy {mean['b']:.3f} vs {mean['a']:.3f}, p={metric.get('p_value')}) "
            f"with {n_b}/{len(w.ids)} devices in arm B: {rec['summary']}"
            if not problems
            else "; ".join(problems)
        )
        verdict = Verdict("ab_experiment", not problems, details, metrics)
        if latency_plot:
            verdict.series[LATENCY_PLOT] = latency_plot
            verdict.x_labels[LATENCY_PLOT] = "latency upper bound (ms, log buckets)"
        return verdict


LATENCY_PLOT = "served latency distribution per version (requests per bucket)"


def _latency_by_version(w: ServiceWorld, versions: dict[str, str]) -> dict[str, list[tuple[float, float]]]:
    """Each version's merged latency histogram from the fleet's telemetry store."""
    store = TelemetryStore(w.fleet.settings.data_dir / "telemetry.db")
    try:
        out: dict[str, list[tuple[float, float]]] = {}
        for label, version in versions.items():
            report = store.query_windows(MODEL_NAME, version)
            if report is None:
                continue
            counts = report.latency_counts
            nz = [i for i, c in enumerate(counts) if c]
            if nz:
                out[label] = [
                    (latency_bucket_upper(i) * 1e3, float(counts[i])) for i in range(nz[0], nz[-1] + 1)
                ]
        return out
    finally:
        store.close()
