"""Scenario 4: devices offline during an update catch up; a broker restart mid-transfer costs no chunk.

Devices reach the broker through the MQTT-aware `FaultProxy`; the fleet talks to it directly.
The broker is this scenario's own Mosquitto (persistent sessions on disk), so it can be
restarted whatever broker the suite was given.

1. Offline: a quarter of the devices are cut off and kept off by the proxy (their Last Will
   marks them offline) while a new bundle is assigned; the others install it; then the
   offline ones are let back and must catch up from the retained director document alone.
2. Broker restart: chunks are made small (4 KiB) and the proxy delays each delivery so that
   transfers are in progress, then the broker is restarted (down one second) while devices
   are mid-transfer. Every device must finish, and must not ask again for a chunk it had
   already been sent before the restart, beyond the requests that were in flight at that
   moment (at most the fetch window per device).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

from simulators.broker import ManagedBroker, find_mosquitto
from simulators.faults import FaultProxy
from simulators.scenario_world import Sampler, failures, world
from simulators.scenarios import ScenarioContext, Verdict, register

CHUNK = 4096
WINDOW = 2
WAIT_S = 90.0
NEEDS_MOSQUITTO = (
    "refused: this scenario restarts its own persistent Mosquitto mid-transfer and Mosquitto is not "
    "installed; the embedded iotcore broker keeps no sessions or retained messages across a restart, "
    "so it cannot stand in (apt-get install mosquitto)"
)


@register(
    4,
    "offline_and_broker_restart",
    "offline devices catch up; a broker restart mid-transfer re-sends no chunk",
)
def offline_and_broker_restart(ctx: ScenarioContext) -> Verdict:
    if find_mosquitto() is None:  # refuse plainly rather than fail deep inside (docs/simulator.md, Broker)
        return Verdict("offline_and_broker_restart", False, NEEDS_MOSQUITTO)
    broker = ManagedBroker(ctx.data_dir / "broker").start()
    proxy = FaultProxy(broker.host, broker.port, seed=7).start()
    own = replace(ctx, broker_port=broker.port)
    try:
        with world(
            own,
            prefix="s4",
            broker_port=proxy.port,
            spec_kwargs={"agent_overrides": {"limits": {"chunk_size": CHUNK, "fetch_window": WINDOW}}},
        ) as w:
            f = w.fleet
            v1 = f.publish_bundle("1.0.0", model_seed=1)
            v2 = f.publish_bundle("2.0.0", model_seed=2)
            v3 = f.publish_bundle("3.0.0", model_seed=3)
            offline = w.ids[::4]
            online = [d for d in w.ids if d not in set(offline)]
            with Sampler(
                w, extra=lambda: ctx.recorder.point("devices online", "online", float(f.online(w.ids)))
            ):
                w.assign_all(v1.bundle_id)
                ok_v1 = w.wait_on(v1.bundle_id, WAIT_S)

                proxy.block(set(offline))
                went_offline = f.wait(lambda: f.online(offline) == 0, 30)
                w.assign_all(v2.bundle_id)
                online_ok = w.wait_on(v2.bundle_id, WAIT_S, online)
                t_back = time.monotonic()
                wall_back = time.time()
                proxy.unblock()
                caught_up = w.wait_on(v2.bundle_id, WAIT_S)
                catch_up_s = time.monotonic() - t_back

                proxy.plan.delay_s = 0.15
                w.assign_all(v3.bundle_id)
                log = f.publisher.request_log
                start = len(log)

                def v3_chunks() -> list[tuple[str, str, int]]:
                    return [e for e in list(log)[start:] if "mlp-3.0.0" in e[1]]

                def mid_transfer() -> bool:
                    per: dict[str, int] = defaultdict(int)
                    for d, _, _ in v3_chunks():
                        per[d] += 1
                    return sum(1 for n in per.values() if n >= 3) >= max(1, len(w.ids) // 2)

                midway = f.wait(mid_transfer, 60, 0.05)
                before = v3_chunks()
                t_restart = time.monotonic()
                broker.restart(down_s=1.0)
                ctx.recorder.point("devices online", "broker restarted", float(len(w.ids)))
                finished = w.wait_on(v3.bundle_id, WAIT_S)
                restart_s = time.monotonic() - t_restart
                proxy.plan.delay_s = 0.0
                after = v3_chunks()[len(before) :]
            early = [
                e
                for e in f.events_of("committed", offline)
                if e.bundle_id == v2.bundle_id and e.timestamp < wall_back
            ]
            stayed = not early
            sent_before: dict[str, set[int]] = defaultdict(set)
            for d, _, off in before:
                sent_before[d].add(off)
            again: dict[str, int] = defaultdict(int)
            for d, _, off in after:
                if off in sent_before[d]:
                    again[d] += 1
            worst = max(again.values(), default=0)
            problems = failures(
                [
                    (ok_v1, "v1 not installed everywhere"),
                    (went_offline, "the cut-off devices were not reported offline (Last Will)"),
                    (online_ok, "the online devices did not install v2"),
                    (stayed, "an offline device committed v2 before it was let back"),
                    (caught_up, f"after reconnecting: {f.active_counts(w.ids)}"),
                    (midway, "no transfer was in progress when the broker was restarted"),
                    (finished, f"after the broker restart: {f.active_counts(w.ids)}"),
                    (worst <= WINDOW, f"a device asked again for {worst} chunks sent before the restart"),
                ]
            )
            metrics = {
                "devices": float(len(w.ids)),
                "offline_devices": float(len(offline)),
                "catch_up_s": catch_up_s,
                "chunks_before_restart": float(len(before)),
                "chunks_after_restart": float(len(after)),
                "chunks_asked_again": float(sum(again.values())),
                "worst_device_asked_again": float(worst),
                "finish_after_restart_s": restart_s,
                "proxy_cut": float(proxy.counters.cut),
            }
            details = (
                f"{len(offline)} offline devices caught up in {catch_up_s:.1f}s; broker restarted with "
                f"{len({d for d, _, _ in before})} devices mid-transfer, all finished in {restart_s:.1f}s, "
                f"{sum(again.values())} chunk re-requests (in flight at the restart; bound {WINDOW}/device)"
                if not problems
                else "; ".join(problems)
            )
            return Verdict("offline_and_broker_restart", not problems, details, metrics)
    finally:
        proxy.stop()
        broker.stop()
