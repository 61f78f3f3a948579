"""Scenario 9: a full disk and skewed clocks, through the real fleet service and its rollouts.

Why these two: both are what real gateways do to an update that is correct in every other
way. A device whose disk cannot hold the new bundle must fail the install with the reason
(ENOSPC) reported, keep serving the bundle it has and leave no partial files behind, and the
fleet must see it; a device whose clock runs past a director document's validity (the fleet
signs documents for 7 days) must refuse it as expired and say so, while a device a few minutes
off installs as usual.

One `service_world`: the real `FleetService` (API, publisher, rollout controller, SQLite) and
a swarm of real agents. Device roles, by position:
- `disk`: the state directory is a tmpfs (`simulators.faults.tiny_disk`) big enough for v1 and
  the agent's own files; what is left free then is less than v2 (a wider MLP, 8.6 x v1's size);
- `ahead`: wall clock 8 days ahead (past the document's 7-day validity);
- `behind`: wall clock 8 days behind (a document's `issued_at` is then in the device's future;
  the contract checks only `expires`, as TUF does, so this device installs);
- `near`: clocks 5 minutes ahead and behind (install normally);
- the rest: plain devices.

1. Provisioning: an all-at-once rollout of v1 (failures tolerated). Every device but `ahead`
   succeeds; `ahead` refuses its document as expired and the rollout records it failed.
2. v2 all at once with an install-failure gate below the failures expected: `disk` devices fail
   with a disk-full reason and stay on v1, `ahead` refuses again, everyone else commits v2,
   and the gate pauses the rollout.

Mounting needs root: without it the verdict fails at once with a sentence saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fleet.errors import FleetMisuseError
from fleet.registry.builder import BundleMetadata, build_bundle
from fleet.rollouts.record_types import DeviceProgress
from fleet.rollouts.records import RolloutRecords
from simulators.datagen import DataGenerator, Schema
from simulators.faults import tiny_disk
from simulators.models import make_mlp_onnx
from simulators.scenario_world import COHORTS, ServiceWorld, failures, service_world
from simulators.scenarios import ScenarioContext, Verdict, register
from simulators.sim_fleet import MODEL_NAME, SIM_HEALTH
from simulators.swarm import make_profiles
from simulators.swarm_device import DeviceProfile

NAME = "full_disk_and_clock_skew"
DAY = 86400.0
SKEWS = {"ahead": 8 * DAY, "behind": -8 * DAY, "near-ahead": 300.0, "near-behind": -300.0}
# The tiny disk holds the agent's files (~110 KB) and v1 installed (~220 KB more; an install
# needs 2 x 80 KB + the agent's 256 KiB reserve free at its start); what is left free then
# (~440 KB) is less than v2 itself.
DISK_BYTES = 768 * 1024
BIG_HIDDEN = 384  # v2: a 32-384-384-4 MLP, a ~700 KB bundle
MIN_DEVICES = 8
ROLLOUT_TIMEOUT_S = 120.0
OUTCOME_TIMEOUT_S = 60.0
FINISHED = ("completed", "aborted", "failed", "cancelled", "paused")
# What an agent may rewrite in its state directory while refusing an update (bookkeeping).
BOOKKEEPING = ("events.sqlite", "telemetry.sqlite", "lifecycle/state.json", "director.json")


def _roles(n: int) -> dict[str, str]:
    """Device id -> role (the first devices are the hostile ones; see the module docstring)."""
    names = [*(["disk"] * max(2, n // 8)), "ahead", "behind", "near-ahead", "near-behind"]
    return {f"dev-{i:05d}": names[i] if i < len(names) else "plain" for i in range(n)}


def _profiles(roles: dict[str, str]) -> list[DeviceProfile]:
    return [
        replace(p, clock_offset_s=SKEWS.get(roles[p.device_id], 0.0), labels={"role": roles[p.device_id]})
        for p in make_profiles(len(roles), COHORTS)
    ]


def _big_bundle(work: Path, schema: Schema, version: str, seed: int) -> Path:
    """A valid bundle of a wider MLP (same inputs and outputs), built by the real builder."""
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{MODEL_NAME}-{version}.onnx"
    model.write_bytes(make_mlp_onnx(seed, sizes=(len(schema.names), BIG_HIDDEN, BIG_HIDDEN, 4)))
    meta = BundleMetadata.model_validate(
        {
            "name": MODEL_NAME,
            "version": version,
            "feature_names": schema.names,
            "categorical": schema.categorical_vocabulary(),
            "quantize": "none",
            "bins": 50,
            "golden_count": 8,
            "health": SIM_HEALTH,
            "seed": seed,
        }
    )
    out = work / f"{MODEL_NAME}-{version}.efb"
    build_bundle(model, meta, out, reference_data=DataGenerator(schema, seed=seed).batch(4000))
    return out


def _files(root: Path) -> dict[str, int]:
    """Every file under `root` (relative path -> size)."""
    out: dict[str, int] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                out[str(p.relative_to(root))] = p.stat().st_size
    return out


def _left_behind(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Files new or grown since `before` that are not the agent's bookkeeping (partial downloads,
    TUF copies, slots)."""
    return sorted(
        f"{path} ({size} B)"
        for path, size in after.items()
        if size > before.get(path, -1) and not path.startswith(BOOKKEEPING)
    )


def _state_record(root: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((root / "lifecycle" / "state.json").read_bytes())
    except (OSError, ValueError):
        return {}
    return data


class _Outcomes:
    """The rollout controller's per-device records (outcome and the reason it kept)."""

    def __init__(self, w: ServiceWorld) -> None:
        self.w = w
        self.records = RolloutRecords(w.fleet.service.store)

    def settle(self, rid: str, timeout: float) -> dict[str, DeviceProgress]:
        """Every device's row once each has an outcome (or what there is at the timeout)."""
        n = len(self.w.ids)
        self.w.wait(lambda: sum(1 for r in self.records.progress(rid) if r.outcome) >= n, timeout)
        return {r.device_id: r for r in self.records.progress(rid)}


def _rollout(
    w: ServiceWorld, version: str, thresholds: dict[str, float], plot: str
) -> tuple[str, dict[str, Any]]:
    rid = w.fleet.rollout(version, {"kind": "all_at_once", "bake_s": 0}, thresholds)
    return rid, w.wait_rollout(rid, FINISHED, ROLLOUT_TIMEOUT_S, plot)


def _bad_rows(rows: dict[str, DeviceProgress], ids: list[str], outcome: str, *marks: str) -> list[str]:
    """Devices of `ids` whose record is not `outcome` with every mark in its detail."""
    out = []
    for d in ids:
        r = rows.get(d)
        detail, got = (r.detail, r.outcome) if r is not None else ("", None)
        if got != outcome or not all(m in detail for m in marks):
            out.append(f"{d}: {got} {detail[:160]!r}")
    return out


@register(
    9,
    NAME,
    "a disk too small for the new bundle and clocks past its validity: clean refusals the fleet records",
)
def full_disk_and_clock_skew(ctx: ScenarioContext) -> Verdict:
    roles = _roles(max(MIN_DEVICES, ctx.devices))
    # the swarm's state stays on disk (`device_state_root`), so the tiny disks can be mounted
    # on the devices' directories before the swarm starts
    own = replace(ctx, devices=len(roles), options={**ctx.options, "state_in_memory": False})
    state_root = own.data_dir / "devices"
    with contextlib.ExitStack() as disks:
        try:
            for d in (d for d, r in roles.items() if r == "disk"):
                disks.enter_context(tiny_disk(state_root / d, DISK_BYTES))
        except FleetMisuseError as exc:
            why = f"refused: the full disk is a size-limited tmpfs and mounting one needs root: {exc}"
            return Verdict(NAME, False, why)
        return _run(own, roles, state_root)


def _run(ctx: ScenarioContext, roles: dict[str, str], state_root: Path) -> Verdict:
    def of(*wanted: str) -> list[str]:
        return [d for d, r in roles.items() if r in wanted]

    disk, ahead, installs = of("disk"), of("ahead"), of("behind", "near-ahead", "near-behind", "plain")
    with service_world(ctx, prefix="h9", profiles=_profiles(roles)) as w:
        if w.swarm.spec.state_root != state_root:
            raise RuntimeError(f"device state in {w.swarm.spec.state_root}, tiny disks in {state_root}")
        outcomes = _Outcomes(w)
        w.fleet.register_bundle("1.0.0", 1)
        big = _big_bundle(w.fleet.settings.import_dir, w.fleet.schema, "2.0.0", 2)
        w.fleet.api_call(
            "POST", f"/v1/models/{MODEL_NAME}/versions/from-bundle", expect=(201,), json={"path": big.name}
        )
        t0 = time.monotonic()
        rid1, st1 = _rollout(w, "1.0.0", {"max_install_failure_pct": 100.0}, "provisioning v1")
        rows1 = outcomes.settle(rid1, OUTCOME_TIMEOUT_S)
        t1 = time.monotonic()
        before = {d: _files(state_root / d) for d in disk}
        free = min(shutil.disk_usage(state_root / d).free for d in disk)
        # a gate that the expected failures (disk + ahead) must cross: the fleet has to see them
        fail_pct = 100.0 * (len(disk) + len(ahead)) / len(roles)
        rid2, st2 = _rollout(w, "2.0.0", {"max_install_failure_pct": fail_pct / 2}, "v2 rollout")
        rows2 = outcomes.settle(rid2, OUTCOME_TIMEOUT_S)
        t2 = time.monotonic()
        w.wait(lambda: all(w.fleet.reported(d).get("active_bundle") == "mlp-2.0.0" for d in installs), 30)
        reported = {d: w.fleet.reported(d) for d in roles}
        left = {d: _left_behind(before[d], _files(state_root / d)) for d in disk}
        records = {d: _state_record(state_root / d) for d in disk}
        breach = [h for h in w.fleet.history(rid2) if "gate breach" in str(h.get("note", ""))]

    def serving(d: str, bundle: str | None) -> bool:
        return reported[d].get("state") == "idle" and reported[d].get("active_bundle") == bundle

    v1_missing = _bad_rows(rows1, disk + installs, "succeeded")
    v2_missing = _bad_rows(rows2, installs, "succeeded")
    refused_v1 = _bad_rows(rows1, ahead, "install_failed", "director document refused", "expired")
    refused_v2 = _bad_rows(rows2, ahead, "install_failed", "director document refused", "expired")
    disk_rows = _bad_rows(rows2, disk, "install_failed", "disk full")
    disk_states = [(r.get("state"), r.get("active")) for r in records.values()]
    problems = failures(
        [
            (
                st1["state"] == "completed",
                f"provisioning ended {st1['state']}: {st1.get('devices_by_status')}",
            ),
            (not v1_missing, f"v1 not committed: {v1_missing}"),
            (not refused_v1, f"a clock 8 days ahead did not refuse v1 as expired: {refused_v1}"),
            (not disk_rows, f"disk-full devices not recorded as failed with the reason: {disk_rows}"),
            (
                all(serving(d, "mlp-1.0.0") for d in disk),
                f"disk-full devices report {[reported[d] for d in disk]}",
            ),
            (
                all(st == ("idle", "mlp-1.0.0") for st in disk_states),
                f"disk-full state records: {disk_states}",
            ),
            (not any(left.values()), f"files left behind on the full disks: {left}"),
            (not refused_v2, f"a clock 8 days ahead did not refuse v2 as expired: {refused_v2}"),
            (
                all(not reported[d].get("active_bundle") for d in ahead),
                "a device 8 days ahead installed a bundle",
            ),
            (not v2_missing, f"v2 not committed: {v2_missing}"),
            (
                all(serving(d, "mlp-2.0.0") for d in installs),
                "a device with a small or backward skew is not on v2",
            ),
            (st2["state"] == "paused" and bool(breach), f"v2 rollout {st2['state']}, no gate breach"),
        ]
    )
    disk_detail = rows2[disk[0]].detail if disk[0] in rows2 else ""
    disk_reason = disk_detail[disk_detail.find("disk full") :].split(" (")[0]
    clock_detail = rows2[ahead[0]].detail if ahead[0] in rows2 else ""
    clock_reason = clock_detail[clock_detail.find("expired") :]
    metrics = {
        "devices": float(len(roles)),
        "disk_full_devices": float(len(disk)),
        "disk_bytes": float(DISK_BYTES),
        "v2_bundle_bytes": float(big.stat().st_size),
        "disk_free_before_v2_bytes": float(free),
        "provision_s": t1 - t0,
        "v2_outcomes_s": t2 - t1,
        "v2_failed": float(sum(1 for r in rows2.values() if r.outcome == "install_failed")),
        "v2_succeeded": float(sum(1 for r in rows2.values() if r.outcome == "succeeded")),
    }
    details = (
        f"{len(disk)} devices with a {DISK_BYTES // 1024} KiB disk refused the "
        f"{big.stat().st_size // 1024} KiB v2 and serve v1, nothing left behind ({disk_reason}); "
        f"a clock 8 days ahead refused both documents ({clock_reason}); {len(installs)} devices "
        f"(clocks 5 min ahead/behind, 8 days behind, exact) committed v2; the failure gate paused the rollout"
        if not problems
        else "; ".join(problems)
    )
    return Verdict(NAME, not problems, details, metrics)
