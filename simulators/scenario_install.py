"""Scenarios 7 and 8: the device-side halves of 1 and 2, without the rollout controller.

The fleet assigns through signed cohort director documents (what a rollout's last stage
does), which isolates the devices' behaviour from the controller's. What these scenarios prove is the
device's half: a good int8 bundle reaches *committed* (idle with it active, after golden
vectors and probation) on every device; a bad bundle (golden vectors from another model) is
refused at activation by every device, which rolls back by itself and keeps serving the
previous version. Stage gates and the rollout abort are scenarios 1 and 2 (`scenario_rollout`).
"""

from __future__ import annotations

import time

from simulators.scenario_world import Sampler, failures, world
from simulators.scenarios import ScenarioContext, Verdict, register

INSTALL_TIMEOUT_S = 90.0


@register(7, "fanout_install", "an int8 bundle reaches every device through signed cohort documents")
def fanout_install(ctx: ScenarioContext) -> Verdict:
    with world(ctx, prefix="s1") as w:
        v1 = w.fleet.publish_bundle("1.0.0", model_seed=1)
        v2 = w.fleet.publish_bundle("2.0.0", model_seed=1, quantize="dynamic")
        with Sampler(w):
            t0 = time.monotonic()
            w.assign_all(v1.bundle_id)
            first = w.wait_on(v1.bundle_id, INSTALL_TIMEOUT_S)
            t1 = time.monotonic()
            w.assign_all(v2.bundle_id)
            second = w.wait_on(v2.bundle_id, INSTALL_TIMEOUT_S)
            t2 = time.monotonic()
        rolled = w.fleet.events_of("rolled_back", w.ids)
        committed = {
            e.device_id for e in w.fleet.events_of("committed", w.ids) if e.bundle_id == v2.bundle_id
        }
        stats = w.swarm.stats()
        problems = failures(
            [
                (first, f"v1 on {len(w.fleet.devices_on(v1.bundle_id, w.ids))}/{len(w.ids)} devices"),
                (second, f"int8 v2 on {len(w.fleet.devices_on(v2.bundle_id, w.ids))}/{len(w.ids)} devices"),
                (not rolled, f"{len(rolled)} rollbacks"),
                (len(committed) == len(w.ids), f"committed events from {len(committed)}/{len(w.ids)}"),
                (v2.manifest.quantization.scheme != "none", "v2 is not quantized"),
            ]
        )
        metrics = {
            "devices": float(len(w.ids)),
            "connect_s": w.swarm.connect_s,
            "install_v1_s": t1 - t0,
            "update_v2_int8_s": t2 - t1,
            "rss_mb_per_device": w.swarm.rss_per_device_mb(),
            "model_sessions": float(sum(s.sessions for s in stats)),
            "chunk_requests": float(len(w.fleet.publisher.request_log)),
        }
        details = (
            f"{len(w.ids)} devices committed int8 {v2.bundle_id} ({v2.manifest.quantization.scheme}) "
            f"in {t2 - t1:.1f}s after v1 in {t1 - t0:.1f}s"
            if not problems
            else "; ".join(problems)
        )
        return Verdict("fanout_install", not problems, details, metrics)


@register(8, "bad_model_rollback", "a bundle failing its golden vectors: every device rolls back by itself")
def bad_model_rollback(ctx: ScenarioContext) -> Verdict:
    with world(ctx, prefix="s2") as w:
        good = w.fleet.publish_bundle("1.0.0", model_seed=1)
        bad = w.fleet.publish_bundle("3.0.0", model_seed=3, golden_seed=2)
        with Sampler(w):
            w.assign_all(good.bundle_id)
            baseline = w.wait_on(good.bundle_id, INSTALL_TIMEOUT_S)
            t0 = time.monotonic()
            w.assign_all(bad.bundle_id)
            refused = w.fleet.wait(
                lambda: (
                    len({e.device_id for e in w.fleet.events_of("rolled_back", w.ids)}) == len(w.ids)
                    or len({e.device_id for e in w.fleet.events_of("update_failed", w.ids)}) == len(w.ids)
                ),
                INSTALL_TIMEOUT_S,
                0.2,
            )
            t1 = time.monotonic()
            back = w.wait_on(good.bundle_id, 30)
        bad_active = [
            d for d, s in w.fleet.reported.items() if d in set(w.ids) and s.active_bundle == bad.bundle_id
        ]
        reasons = sorted(
            {
                e.reason[:80]
                for e in w.fleet.events_of("rolled_back", w.ids) + w.fleet.events_of("update_failed", w.ids)
            }
        )
        problems = failures(
            [
                (baseline, "baseline v1 not installed everywhere"),
                (refused, "not every device reported a rollback / failed update for the bad bundle"),
                (back, f"devices not back on {good.bundle_id}: {w.fleet.active_counts(w.ids)}"),
                (not bad_active, f"{len(bad_active)} devices still run the bad bundle"),
            ]
        )
        metrics = {"devices": float(len(w.ids)), "all_rolled_back_s": t1 - t0}
        details = (
            f"every device refused {bad.bundle_id} and serves {good.bundle_id} "
            f"(reasons: {'; '.join(reasons[:2])})"
            if not problems
            else "; ".join(problems)
        )
        return Verdict("bad_model_rollback", not problems, details, metrics)
