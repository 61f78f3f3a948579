"""The real fleet service for a simulation: API, publisher, rollout controller over SQLite.

Why the whole service: the rollout scenarios must exercise what an operator uses, so the
simulator starts `fleet.service.FleetService` with `fleet.components.build_components`
exactly as `edgefleet fleet serve` wires them (SQLite in the scenario's directory, keys and
TUF repository created on first start), registers bundles through the HTTP API
(`from-bundle`), enrolls the swarm's devices in the store (the enrollment handshake itself
is tested elsewhere; here it would only add one round trip per device), and creates and
watches rollouts through the API.

Errors: `ServiceFleet.api_call` raises `fleet.errors.FleetTransportError` on an unexpected
HTTP status (the body is in the message).
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from fleet.access.auth import create_api_key
from fleet.components import ServeConfig, build_components
from fleet.errors import FleetTransportError
from fleet.service import FleetService
from fleet.settings import FleetSettings, TelemetrySettings
from fleet.training.policy import TrainingSettings
from simulators.datagen import Schema, default_schema
from simulators.device_keys import sim_device_public_key
from simulators.sim_fleet import MODEL_NAME, build_mlp_bundle
from simulators.swarm_device import DeviceProfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceFleet:
    """`FleetService` in this process, driven over its own HTTP API."""

    def __init__(
        self,
        root: Path,
        broker_host: str,
        broker_port: int,
        prefix: str,
        schema: Schema | None = None,
        tick_s: float = 0.2,
        port: int | None = None,
        window_s: float = 60.0,
        telemetry: TelemetrySettings | None = None,
        training: TrainingSettings | None = None,
    ) -> None:
        self.schema = schema or default_schema()
        self.settings = FleetSettings(
            data_dir=root,
            port=port or _free_port(),
            broker_url=f"mqtt://{broker_host}:{broker_port}",
            topic_prefix=prefix,
            telemetry=telemetry or TelemetrySettings(),
            training=training or TrainingSettings(),
        )
        self.settings.import_dir.mkdir(parents=True, exist_ok=True)
        cfg = ServeConfig(controller_tick_s=tick_s, timestamp_refresh_s=3600, root_keys=1, root_threshold=1,
                          telemetry_window_s=window_s)
        self.service = FleetService(
            self.settings,
            component_factory=lambda store: build_components(
                self.settings, store, with_broker=True, config=cfg
            ),
        )
        self.key = ""
        self._http: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def bootstrap_root(self) -> Path:
        return self.settings.repo_dir / "metadata" / "1.root.json"

    def start(self) -> ServiceFleet:
        self.service.start_background()
        self.key = create_api_key(self.service.store, "simulator", "operator", "simulator")[1]
        self._http = httpx.Client(
            base_url=self.base_url, timeout=30, headers={"Authorization": f"Bearer {self.key}"}
        )
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
        self.service.stop()

    def api_call(self, method: str, path: str, expect: Iterable[int] = (200,), **kw: Any) -> Any:
        assert self._http is not None, "start() first"
        res = self._http.request(method, path, **kw)
        if res.status_code not in set(expect):
            raise FleetTransportError(f"{method} {path}: HTTP {res.status_code}: {res.text[:300]}")
        return res.json() if res.content else None

    # --- operator actions --------------------------------------------------------------------
    def register_bundle(
        self, version: str, model_seed: int, *, golden_seed: int | None = None, quantize: str = "none"
    ) -> str:
        """Build the bundle into the import directory and register it through the API; its bundle id."""
        build_mlp_bundle(
            self.settings.import_dir,
            self.schema,
            version,
            model_seed,
            golden_seed=golden_seed,
            quantize=quantize,
        )
        self.api_call(
            "POST",
            f"/v1/models/{MODEL_NAME}/versions/from-bundle",
            expect=(201,),
            json={"path": f"{MODEL_NAME}-{version}.efb"},
        )
        return f"{MODEL_NAME}-{version}"

    def enroll(self, profiles: Iterable[DeviceProfile]) -> None:
        """Put the devices in the store as enrollment would (labels: cohort, site, runtime facts)."""
        for p in profiles:
            labels = {"site": "sim", "cohort": p.cohort, **p.labels}
            facts = {"runtimes": list(p.runtimes), "memory_mb": p.memory_mb, "agent_version": p.agent_version}
            self.service.store.devices.create(
                p.device_id, labels, facts, p.device_id, "$7$unused", "simulator"
            )
            self.service.store.report_keys.register(p.device_id, sim_device_public_key(p.device_id),
                                                    "simulator", audited=False)

    def rollout(
        self, version: str, strategy: dict[str, Any], thresholds: dict[str, float] | None = None
    ) -> str:
        ro = self.api_call(
            "POST",
            "/v1/rollouts",
            expect=(201,),
            json={
                "model_version_id": f"{MODEL_NAME}:{version}",
                "selector": "site=sim",
                "strategy": strategy,
                "thresholds": thresholds or {},
            },
        )
        return str(ro["id"])

    def status(self, rollout_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.api_call("GET", f"/v1/rollouts/{rollout_id}/status")
        return out

    def history(self, rollout_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.api_call("GET", f"/v1/rollouts/{rollout_id}")["history"]
        return out

    # --- what the fleet knows about devices ---------------------------------------------------
    def reported(self, device_id: str) -> dict[str, Any]:
        return dict(self.service.store.devices.get(device_id).reported_state or {})

    def serving(self, devices: Iterable[str]) -> Counter[str]:
        """Devices per committed bundle (`idle` with it active); others counted by their state."""
        out: Counter[str] = Counter()
        for d in devices:
            st = self.reported(d)
            out[
                st.get("active_bundle") or "none" if st.get("state") == "idle" else st.get("state", "unknown")
            ] += 1
        return out
