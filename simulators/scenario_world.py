"""What every scenario sets up: a fleet side, a swarm of real agents, and a progress sampler.

Why one helper: each scenario needs the same sequence (start the fleet's components, start
the swarm on the fleet's trusted root, wait until every device is connected and reporting,
tear everything down even when a check fails), and the same time series for the report
(devices per active bundle over time). Scenarios differ only in what they do in between.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from simulators.datagen import Schema, default_schema
from simulators.scenarios import ScenarioContext
from simulators.sim_fleet import SimFleet, wait_for
from simulators.sim_service import ServiceFleet
from simulators.swarm import Swarm, make_profiles
from simulators.swarm_device import DeviceProfile
from simulators.swarm_records import SwarmSpec

COHORTS = ("eu", "us")


LARGE_SWARM = 200


def load_defaults(devices: int) -> dict[str, Any]:
    """Swarm settings that keep a large swarm within two cores: every agent has two threads
    (lifecycle and ticker) waking every `report_interval_s`, so above `LARGE_SWARM` devices
    they tick every 2 s instead of 0.5 s, and send fewer inference batches."""
    if devices <= LARGE_SWARM:
        return {}
    return {"agent_overrides": {"report_interval_s": 2.0}, "traffic_interval_s": 2.0}


MEMORY_FS = Path("/dev/shm")


@contextlib.contextmanager
def device_state_root(ctx: ScenarioContext) -> Iterator[Path]:
    """Where the devices' state directories live.

    Every agent writes its state record, ledger, slots and queues durably (fsync), which is
    right for a device with its own flash; a thousand simulated devices doing it on one disk
    turn the shared journal into the bottleneck (installs of 1,000 devices stalled for minutes
    here, with hundreds of threads in uninterruptible I/O). Above `LARGE_SWARM` devices (or
    with `options["state_in_memory"]`) the state goes to a tmpfs (`/dev/shm`), where fsync
    is free, and is removed afterwards; smaller swarms keep it under the scenario directory.
    """
    in_memory = ctx.options.get("state_in_memory", ctx.devices > LARGE_SWARM)
    if not in_memory or not MEMORY_FS.is_dir():
        yield ctx.data_dir / "devices"
        return
    root = Path(tempfile.mkdtemp(prefix="edgefleet-swarm-", dir=MEMORY_FS))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class World:
    ctx: ScenarioContext
    fleet: SimFleet
    swarm: Swarm

    @property
    def ids(self) -> list[str]:
        return self.swarm.device_ids

    def cohort_ids(self, cohort: str) -> list[str]:
        return [p.device_id for p in self.swarm.profiles if p.cohort == cohort]

    def assign_all(self, bundle_id: str) -> None:
        """One signed director document per cohort (the cohort documents every device follows)."""
        for c in sorted({p.cohort for p in self.swarm.profiles}):
            self.fleet.assign(bundle_id, cohort=c)

    def wait_on(self, bundle_id: str, timeout: float, devices: Sequence[str] | None = None) -> bool:
        """Until every device (of `devices`) reports idle with `bundle_id` active."""
        ids = list(devices) if devices is not None else self.ids

        def done() -> bool:
            self.swarm.check_alive()
            on = len(self.fleet.devices_on(bundle_id, ids))
            self.ctx.progress(f"devices on {bundle_id}", on, len(ids))
            return on == len(ids)

        return self.fleet.wait(done, timeout, 0.2)

    def sample(self, plot: str = "devices per active bundle") -> None:
        for bundle, n in sorted(self.fleet.active_counts(self.ids).items()):
            self.ctx.recorder.point(plot, bundle, float(n))


class Sampler:
    """Records `World.sample` every `period_s` on a background thread while in use."""

    def __init__(self, world: World, period_s: float = 0.5, extra: Callable[[], None] | None = None) -> None:
        self.world, self.period_s, self.extra = world, period_s, extra
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.world.sample()
            if self.extra is not None:
                self.extra()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.world.sample()


def _spec(ctx: ScenarioContext, base: SwarmSpec, spec_kwargs: dict[str, Any] | None) -> SwarmSpec:
    return replace(
        base, **{**load_defaults(ctx.devices), **(spec_kwargs or {}), **ctx.options.get("spec", {})}
    )


@contextlib.contextmanager
def world(
    ctx: ScenarioContext,
    *,
    prefix: str,
    profiles: list[DeviceProfile] | None = None,
    schema: Schema | None = None,
    broker_port: int | None = None,
    fleet_kwargs: dict[str, Any] | None = None,
    spec_kwargs: dict[str, Any] | None = None,
) -> Iterator[World]:
    """Fleet + swarm for one scenario; devices connect to `broker_port` (default: the broker)."""
    schema = schema or default_schema()
    with contextlib.ExitStack() as stack:
        ctx.progress("starting the fleet", 0, ctx.devices)
        fleet = SimFleet(
            ctx.data_dir / "fleet",
            ctx.broker_host,
            ctx.broker_port,
            prefix=prefix,
            schema=schema,
            **(fleet_kwargs or {}),
        ).start()
        stack.callback(fleet.stop)
        base = SwarmSpec(
            broker_host=ctx.broker_host,
            broker_port=broker_port or ctx.broker_port,
            prefix=prefix,
            bootstrap_root=fleet.bootstrap_root,
            state_root=stack.enter_context(device_state_root(ctx)),
            schema=schema,
        )
        devices = profiles or make_profiles(ctx.devices, COHORTS)
        ctx.progress(f"starting {len(devices)} devices", 0, len(devices))
        swarm = Swarm(_spec(ctx, base, spec_kwargs), devices, ctx.processes).start()
        stack.callback(swarm.stop)
        w = World(ctx, fleet, swarm)
        ctx.progress("connecting devices to the broker", 0, len(devices))
        if not swarm.wait_connected(60):
            raise RuntimeError("not every device connected to the broker within 60 s")
        fleet.wait(lambda: fleet.online(w.ids) == len(w.ids), 30, 0.2)
        ctx.progress("devices online", len(w.ids), len(w.ids))
        ctx.recorder.take()
        yield w


def failures(checks: Iterable[tuple[bool, str]]) -> list[str]:
    """The messages of the checks that did not hold."""
    return [msg for ok, msg in checks if not ok]


@dataclass
class ServiceWorld:
    """The real fleet service (API + publisher + controller) and a swarm enrolled in it."""

    ctx: ScenarioContext
    fleet: ServiceFleet
    swarm: Swarm

    @property
    def ids(self) -> list[str]:
        return self.swarm.device_ids

    def all_serving(self, bundle_id: str) -> bool:
        return self.fleet.serving(self.ids).get(bundle_id, 0) == len(self.ids)

    def wait(self, pred: Callable[[], bool], timeout: float, poll_s: float = 0.2) -> bool:
        """`pred()` until true or timeout; raises `FleetTransportError` if a swarm worker crashed."""

        def checked() -> bool:
            self.swarm.check_alive()
            return pred()

        return wait_for(checked, timeout, poll_s)

    def wait_rollout(
        self, rollout_id: str, states: tuple[str, ...], timeout: float, plot: str
    ) -> dict[str, Any]:
        """Poll the rollout's status until it reaches one of `states`, recording its progress.

        Raises `FleetTransportError` if a swarm worker crashed meanwhile.
        """
        deadline = time.monotonic() + timeout
        st = self.fleet.status(rollout_id)
        while time.monotonic() < deadline:
            self.swarm.check_alive()
            st = self.fleet.status(rollout_id)
            by_status = st.get("devices_by_status", {})
            self.ctx.progress(f"rollout {st['state']}, stage {st.get('stage', 0)}",
                              int(by_status.get("succeeded", 0)), len(self.ids))
            for status, n in sorted(by_status.items()):
                self.ctx.recorder.point(plot, status, float(n))
            self.ctx.recorder.point(plot, "stage", float(st.get("stage", 0)))
            if st["state"] in states:
                return st
            time.sleep(0.25)
        return st


@contextlib.contextmanager
def service_world(
    ctx: ScenarioContext,
    *,
    prefix: str,
    profiles: list[DeviceProfile] | None = None,
    spec_kwargs: dict[str, Any] | None = None,
    fleet_kwargs: dict[str, Any] | None = None,
) -> Iterator[ServiceWorld]:
    """`ServiceFleet` (`fleet_kwargs`: its window, telemetry and training settings) + enrolled
    swarm for one scenario (torn down in reverse order)."""
    with contextlib.ExitStack() as stack:
        ctx.progress("starting the fleet service", 0, ctx.devices)
        fleet = ServiceFleet(ctx.data_dir / "fleet", ctx.broker_host, ctx.broker_port, prefix,
                             **(fleet_kwargs or {})).start()
        stack.callback(fleet.stop)
        devices = profiles or make_profiles(ctx.devices, COHORTS)
        ctx.progress(f"enrolling {len(devices)} devices", 0, len(devices))
        fleet.enroll(devices)
        base = SwarmSpec(
            broker_host=ctx.broker_host,
            broker_port=ctx.broker_port,
            prefix=prefix,
            bootstrap_root=fleet.bootstrap_root,
            state_root=stack.enter_context(device_state_root(ctx)),
            schema=fleet.schema,
        )
        ctx.progress(f"starting {len(devices)} devices", 0, len(devices))
        swarm = Swarm(_spec(ctx, base, spec_kwargs), devices, ctx.processes).start()
        stack.callback(swarm.stop)
        ctx.progress("connecting devices to the broker", 0, len(devices))
        if not swarm.wait_connected(60):
            raise RuntimeError("not every device connected to the broker within 60 s")
        ctx.progress("devices connected", len(devices), len(devices))
        ctx.recorder.take()
        yield ServiceWorld(ctx, fleet, swarm)
