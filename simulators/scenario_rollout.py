"""Scenarios 1 and 2: rollouts through the real fleet service and its rollout controller.

1. `canary_rollout`: after an all-at-once provisioning rollout of v1, an int8 v2 goes out
   as a canary (10 % -> 50 % -> 100 %, a short bake per stage). Passed when the rollout
   completes with every device `succeeded` (the controller counts a device only once it
   reports idle with the bundle active, i.e. after golden vectors and probation), every
   stage was walked in order, and every device serves v2.
2. `bad_model_abort`: v3 carries golden vectors of another model, so every device that
   receives it fails activation and rolls back by itself. With a canary of 20 % and
   `on_breach: abort` the controller's failure gate aborts the rollout after the first
   stage; passed when the rollout ends `aborted`, no device succeeded with v3, and every
   device ends on v2 (devices of the first stage rolled back, the others never got it).
"""

from __future__ import annotations

import time

from simulators.scenario_world import ServiceWorld, failures, service_world
from simulators.scenarios import ScenarioContext, Verdict, register

ROLLOUT_TIMEOUT_S = 120.0  # at least; large swarms get 0.6 s per device (1,000 devices share 2 cores)


def _timeout(ctx: ScenarioContext) -> float:
    return max(ROLLOUT_TIMEOUT_S, 0.6 * ctx.devices)


PROGRESS = "rollout progress (devices by status, stage)"


def _provision(w: ServiceWorld, version: str) -> bool:
    rid = w.fleet.rollout(version, {"kind": "all_at_once", "bake_s": 0})
    st = w.wait_rollout(rid, ("completed", "aborted", "failed", "cancelled"), _timeout(w.ctx), "provisioning")
    return st["state"] == "completed" and w.wait(lambda: w.all_serving(f"mlp-{version}"), 30)


@register(1, "canary_rollout", "an int8 model promoted through canary stages 10/50/100 % to every device")
def canary_rollout(ctx: ScenarioContext) -> Verdict:
    with service_world(ctx, prefix="r1") as w:
        w.fleet.register_bundle("1.0.0", 1)
        w.fleet.register_bundle("2.0.0", 1, quantize="dynamic")
        provisioned = _provision(w, "1.0.0")
        t0 = time.monotonic()
        rid = w.fleet.rollout("2.0.0", {"kind": "canary", "stages": [10, 50, 100], "bake_s": 1.0})
        st = w.wait_rollout(rid, ("completed", "aborted", "failed", "cancelled"), _timeout(ctx), PROGRESS)
        elapsed = time.monotonic() - t0
        serving = w.wait(lambda: w.all_serving("mlp-2.0.0"), 30)
        stages = [h.get("stage") for h in w.fleet.history(rid) if h.get("event") == "state:running"]
        n = len(w.ids)
        problems = failures(
            [
                (provisioned, "provisioning v1 did not complete"),
                (st["state"] == "completed", f"rollout ended {st['state']}: {st.get('devices_by_status')}"),
                (
                    st.get("devices_by_status") == {"succeeded": n},
                    f"device outcomes {st.get('devices_by_status')}",
                ),
                (stages == [0, 1, 2], f"stages walked {stages}"),
                (serving, f"serving: {dict(w.fleet.serving(w.ids))}"),
            ]
        )
        metrics = {
            "devices": float(n),
            "rollout_to_100pct_s": elapsed,
            "connect_s": w.swarm.connect_s,
            "rss_mb_per_device": w.swarm.rss_per_device_mb(),
        }
        details = (
            f"int8 mlp-2.0.0 promoted through stages {stages} to all {n} devices in {elapsed:.1f}s"
            if not problems
            else "; ".join(problems)
        )
        return Verdict("canary_rollout", not problems, details, metrics)


@register(2, "bad_model_abort", "a model failing golden vectors: devices roll back, the rollout aborts")
def bad_model_abort(ctx: ScenarioContext) -> Verdict:
    with service_world(ctx, prefix="r2") as w:
        w.fleet.register_bundle("2.0.0", 2)
        w.fleet.register_bundle("3.0.0", 3, golden_seed=2)
        provisioned = _provision(w, "2.0.0")
        t0 = time.monotonic()
        rid = w.fleet.rollout(
            "3.0.0", {"kind": "canary", "stages": [20, 100], "bake_s": 0, "on_breach": "abort"}
        )
        st = w.wait_rollout(rid, ("aborted", "completed", "failed", "cancelled"), _timeout(ctx), PROGRESS)
        elapsed = time.monotonic() - t0
        back = w.wait(lambda: w.all_serving("mlp-2.0.0"), 60)
        by_status = st.get("devices_by_status", {})
        n = len(w.ids)
        problems = failures(
            [
                (provisioned, "provisioning v2 did not complete"),
                (st["state"] == "aborted", f"rollout ended {st['state']} ({by_status})"),
                (
                    "succeeded" not in by_status,
                    f"{by_status.get('succeeded')} devices succeeded with the bad model",
                ),
                (by_status.get("rolled_back", 0) >= 1, f"no device rolled back by itself ({by_status})"),
                (back, f"not every device back on mlp-2.0.0: {dict(w.fleet.serving(w.ids))}"),
            ]
        )
        metrics = {
            "devices": float(n),
            "abort_s": elapsed,
            "rolled_back": float(by_status.get("rolled_back", 0)),
            "never_assigned": float(by_status.get("skipped", 0)),
        }
        details = (
            f"{by_status.get('rolled_back', 0)} canary devices rolled back by themselves, "
            f"the rollout aborted in {elapsed:.1f}s, all {n} devices serve mlp-2.0.0"
            if not problems
            else "; ".join(problems)
        )
        return Verdict("bad_model_abort", not problems, details, metrics)
