"""A fleet that keeps running: the real service, a swarm enrolled in it, and a short story.

Why: the dashboard needs something alive to show, both for `edgefleet demo --serve` (a
newcomer watches a rollout and a drift alert happen) and for the browser tests (which must
see a rollout progress and drift appear in a real `fleet serve`). Both use this module, so
what the tests check is what the demo shows.

The service is `ServiceFleet` (the `fleet serve` wiring) with short telemetry windows and a
drift monitor that evaluates every second, so drift shows within seconds instead of minutes.
The story (`provision`, `canary`, `inject_drift`) uses the API as an operator would; the
drift is the drift scenario's (`scenario_drift.drift_specs`: cohort `eu` shifts).

Errors: `start` raises `FleetTransportError` when the swarm does not connect; the story's
steps raise it when a rollout does not finish in time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from fleet.access.auth import create_api_key
from fleet.errors import FleetMisuseError, FleetTransportError
from fleet.rollouts.store import FINISHED_STATES
from fleet.settings import TelemetrySettings
from fleet.telemetry.monitor import DriftMonitor
from simulators.scenario_drift import drift_specs
from simulators.scenario_world import COHORTS
from simulators.sim_fleet import MODEL_NAME, wait_for
from simulators.sim_service import ServiceFleet
from simulators.swarm import Swarm, make_profiles
from simulators.swarm_records import SwarmSpec

FINAL = FINISHED_STATES  # the states a rollout stops in by itself


class LiveFleet:
    """`ServiceFleet` + enrolled swarm under `root` (stop with `stop()`)."""

    def __init__(self, root: Path, broker_host: str, broker_port: int, devices: int, *, prefix: str = "live",
                 window_s: float = 4.0, processes: int = 1, port: int | None = None) -> None:
        self.root = root
        self.window_s = window_s
        telemetry = TelemetrySettings(evaluate_interval_s=1.0, settle_s=max(1.0, window_s / 2),
                                      persist_windows=2)
        self.fleet = ServiceFleet(root / "fleet", broker_host, broker_port, prefix, tick_s=0.2, port=port,
                                  window_s=window_s, telemetry=telemetry)
        self.profiles = make_profiles(devices, COHORTS)
        self.spec = SwarmSpec(broker_host, broker_port, prefix, self.fleet.bootstrap_root, root / "devices",
                              schema=self.fleet.schema, telemetry_interval_s=1.0, traffic_interval_s=0.25,
                              traffic_batch=32)
        self.processes = processes
        self.swarm: Swarm | None = None

    @property
    def url(self) -> str:
        return self.fleet.base_url + "/ui/"

    @property
    def ids(self) -> list[str]:
        return [p.device_id for p in self.profiles]

    def start(self, connect_timeout_s: float = 90.0) -> LiveFleet:
        """Start the service, enroll the devices, start the swarm and wait until it is connected."""
        self.fleet.start()
        self.fleet.enroll(self.profiles)
        self.swarm = Swarm(self.spec, self.profiles, self.processes).start()
        if not self.swarm.wait_connected(connect_timeout_s):
            self.stop()
            raise FleetTransportError(f"the swarm did not connect within {connect_timeout_s:.0f} s")
        return self

    def stop(self) -> None:
        if self.swarm is not None:
            with contextlib.suppress(Exception):  # stop the service whatever the workers did
                self.swarm.stop()
        self.fleet.stop()

    def login_key(self, role: str, name: str | None = None) -> str:
        """A fresh API key of `role` (shown once, like `fleet create-admin-key`)."""
        return create_api_key(self.fleet.service.store, name or f"dashboard-{role}", role, "demo")[1]

    def register(self, *versions: str) -> None:
        """Build and register bundles `1.0.0`, `2.0.0`, ... (model seed 1; 2.0.0+ int8)."""
        for v in versions:
            self.fleet.register_bundle(v, 1, quantize="none" if v == "1.0.0" else "dynamic")

    def wait_state(self, rollout_id: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """The rollout's status once in one of `states`. Raises FleetTransportError on timeout."""
        found: dict[str, Any] = {}

        def reached() -> bool:
            found.update(self.fleet.status(rollout_id))
            return found["state"] in states

        if not wait_for(reached, timeout, 1.0):
            raise FleetTransportError(f"rollout {rollout_id} still {found.get('state')} after {timeout:.0f}s")
        return found

    def provision(self, version: str, timeout: float = 120.0) -> str:
        """All devices onto `version` at once; returns the rollout id once it completed."""
        rid = self.fleet.rollout(version, {"kind": "all_at_once", "bake_s": 0})
        st = self.wait_state(rid, FINAL, timeout)
        if st["state"] != "completed":
            counts = st["devices_by_status"]
            raise FleetTransportError(f"provisioning {version} ended {st['state']}: {counts}")
        return rid

    def canary(self, version: str, stages: list[float], bake_s: float) -> str:
        """Start a canary rollout of `version` (latency gate relaxed: the swarm shares two cores)."""
        return self.fleet.rollout(version, {"kind": "canary", "stages": stages, "bake_s": bake_s},
                                  {"max_latency_p95_ratio": 100.0})

    def inject_drift(self) -> None:
        """Shift cohort `eu`'s inputs (twenty of thirty-two features), as the drift scenario does."""
        assert self.swarm is not None, "start() first"
        self.swarm.set_drift(drift_specs())

    @property
    def monitor(self) -> DriftMonitor:
        """The service's drift monitor (the one the composition root built and the API shares).

        Raises FleetMisuseError when the service was built without one."""
        parts = self.fleet.service.parts
        monitor = parts.api.monitor if parts is not None else None
        if monitor is None:
            raise FleetMisuseError("the live fleet's service has no drift monitor")
        return monitor

    def wait_alert(self, timeout: float = 60.0) -> bool:
        """Until the drift monitor has raised at least one drift alert."""
        monitor = self.monitor
        return wait_for(lambda: bool(monitor.alerts.alerts(MODEL_NAME, "drift")), timeout, 0.5)
