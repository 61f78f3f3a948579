"""What site policies cost the rollout controller: ticks with a disruption budget and windows.

The same 500-device cohort (50 sites) is rolled out twice in one run, once with a plain
`all_at_once` plan (the baseline) and once with a budget per site that admits everyone
(`max_unavailable: 100%`) and activation windows (each document carries them), so both
assign the same devices and the difference is the policies' own work: reading the cohort's
labels, grouping, admitting, resolving and signing windows. Also timed: `admit` alone over
10,000 waiting devices in 1,000 groups, and one `is_open` judgement (what an agent pays).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from agent.contract.windows import Window, is_open, zone
from benchmarks.rollout_fixture import CountingPublisher, median_tick_s, seed_idle_devices, seed_models
from fleet.rollouts.controller import RolloutController
from fleet.rollouts.policies import DisruptionBudget, admit
from fleet.store import Store
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore

NAME = "rollout_policies"
DESCRIPTION = "rollout ticks with a per-site budget and windows vs a plain plan; admit and is_open alone"
N, SITES = 500, 50
POLICIES = {"budget": {"group_by": ["site"], "max_unavailable": "100%"},
            "windows": {"activation": {"cron": "0 2 * * *", "duration_s": 7200}, "tz": "Europe/Berlin"}}


def _ticks(root: Path, plan: dict[str, Any]) -> tuple[float, float]:
    """(assign tick s, median idle tick s) of one rollout of `plan` over a fresh fleet."""
    store = Store(root / "fleet.db")
    repo = seed_models(store, root)
    seed_idle_devices(store, [f"dev-{i:04d}" for i in range(N)],
                      lambda i: {"env": "bench", "site": f"s{i % SITES}"})
    signer = DirectorSigner(KeyStore(root / "keys"), root / "director")
    ctl = RolloutController(store, repo, signer, CountingPublisher())
    store.rollouts.create("mlp:2.0.0", "env=bench", plan, {}, "bench")
    t0 = time.perf_counter()
    ctl.tick()
    assign = time.perf_counter() - t0
    idle = median_tick_s(ctl.tick)
    store.close()
    return assign, idle


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        plain_assign, plain_idle = _ticks(Path(a), {"kind": "all_at_once"})
        policy_assign, policy_idle = _ticks(Path(b), {"kind": "all_at_once", **POLICIES})
    budget = DisruptionBudget(group_by=["site"], max_unavailable=1)
    waiting = [(f"d{i}", f"site=g{i % 1000}") for i in range(10_000)]
    sizes = {f"site=g{g}": 10 for g in range(1000)}
    t0 = time.perf_counter()
    admitted = admit(budget, waiting, sizes, {}, 10_000)
    admit_s = time.perf_counter() - t0
    assert len(admitted) == 1000
    window, berlin = Window(cron="0 2 * * *", duration_s=7200), zone("Europe/Berlin")
    is_open(window, berlin, time.time())  # croniter imported once, as on a device
    t0 = time.perf_counter()
    for i in range(1000):
        is_open(window, berlin, 1.8e9 + i * 37.0)
    open_us = (time.perf_counter() - t0) / 1000 * 1e6
    return {
        "baseline_plain_assign_tick_s": plain_assign,
        "policies_assign_tick_s": policy_assign,
        "baseline_plain_idle_tick_ms": plain_idle * 1e3,
        "policies_idle_tick_ms": policy_idle * 1e3,
        "admit_10k_devices_1k_groups_ms": admit_s * 1e3,
        "window_is_open_us": open_us,
    }
