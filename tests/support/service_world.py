"""The end-to-end tests' fleet: a real `fleet serve` (FleetService with its MQTT components) in
this process, and the operator's view of it over HTTP.

Every e2e test that runs real agents against a real fleet starts the service and talks to its
API the same way; these are those pieces, once, and `ServiceWorld` puts them together with the
broker, the bundles and the agent processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Self

import httpx

from agent.contract.bundle import write_bundle
from fleet.access.auth import create_api_key
from fleet.components import ServeConfig, build_components
from fleet.service import FleetService
from fleet.settings import FleetSettings
from simulators.models import make_mlp_onnx
from tests.support.agent_world import A, wait_until, write_agent_config
from tests.support.broker import Broker, free_port, start_mosquitto
from tests.support.lifecycle_world import manifest_for
from tests.support.report_signing import DeviceKey


def start_fleet_service(settings: FleetSettings, tick_s: float = 0.1) -> FleetService:
    """`fleet serve` with the broker, a fast controller tick and no timestamp refresh, started."""
    cfg = ServeConfig(controller_tick_s=tick_s, timestamp_refresh_s=3600)
    service = FleetService(settings, component_factory=lambda store: build_components(
        settings, store, with_broker=True, config=cfg))
    service.start_background()
    return service


def api_client(settings: FleetSettings, key: str, timeout: float = 10.0) -> httpx.Client:
    """An HTTP client of the service's admin API with `key` as its bearer token."""
    return httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=timeout,
                        headers={"Authorization": f"Bearer {key}"})


def rollout_status(client: httpx.Client, rid: str) -> dict[str, Any]:
    """`GET /v1/rollouts/{rid}/status` as a dict."""
    out: dict[str, Any] = client.get(f"/v1/rollouts/{rid}/status").json()
    return out


def agent_logs(agents: dict[str, Any], lines: int = 8) -> str:
    """The last `lines` log lines of each agent, for a failure message."""
    return "\n".join(f"--- {d}\n{a.tail(lines)}" for d, a in agents.items())


def write_mlp_bundles(import_dir: Path, seeds: Mapping[str, tuple[int, int]], health: dict[str, Any]) -> None:
    """`mlp-<version>.efb` in the fleet's import dir for each version -> (model seed, golden seed)."""
    for version, (model_seed, golden_seed) in seeds.items():
        model = make_mlp_onnx(model_seed)
        write_bundle(manifest_for(version, model, golden_seed, health), model,
                     import_dir / f"mlp-{version}.efb")


@dataclass
class ServiceWorld(Generic[A]):
    """A real fleet service over SQLite, its private Mosquitto, an operator key and agent processes.

    What the e2e tests that run agents against `fleet serve` share: `open` starts the broker and
    the service with mlp bundles in the import dir, `add_agent` registers a device (with a report
    key, as enrollment does) and writes its agent's config, the rest drive the API. A test
    module subclasses it for its own waits and shorthands.
    """

    root: Path
    broker: Broker
    settings: FleetSettings
    service: FleetService
    key: str
    agent_cls: type[A]
    agents: dict[str, A] = field(default_factory=dict)
    device_keys: dict[str, DeviceKey] = field(default_factory=dict)

    API_TIMEOUT: ClassVar[float] = 10.0
    LOG_LINES: ClassVar[int] = 8

    @classmethod
    def open(cls, root: Path, prefix: str, seeds: Mapping[str, tuple[int, int]], health: dict[str, Any],
             agent_cls: type[A]) -> Self:
        """Broker, bundles (`write_mlp_bundles`), service and an operator API key under `root`."""
        broker = start_mosquitto(root / "broker")
        settings = FleetSettings(data_dir=root / "fleet", port=free_port(), broker_url=broker.url,
                                 topic_prefix=prefix)
        settings.import_dir.mkdir(parents=True)
        write_mlp_bundles(settings.import_dir, seeds, health)
        service = start_fleet_service(settings)  # first start: keys and repository are created
        key = create_api_key(service.store, "ops", "operator", "test")[1]
        return cls(root, broker, settings, service, key, agent_cls)

    @property
    def api(self) -> httpx.Client:
        return api_client(self.settings, self.key, timeout=self.API_TIMEOUT)

    def start_service(self) -> None:
        """Start the service again after `service.stop()` (on a fresh port: the old one may linger)."""
        self.settings = self.settings.model_copy(update={"port": free_port()})
        self.service = start_fleet_service(self.settings)

    def register_bundle(self, version: str) -> dict[str, Any]:
        """`from-bundle` for `mlp-<version>.efb` of the import dir (201 asserted); the new version."""
        with self.api as c:
            res = c.post("/v1/models/mlp/versions/from-bundle", json={"path": f"mlp-{version}.efb"})
        assert res.status_code == 201, res.text
        out: dict[str, Any] = res.json()
        return out

    def add_agent(self, device: str, labels: dict[str, str], agent_labels: dict[str, str] | None = None,
                  start: bool = True, before_start: Callable[[A], object] | None = None) -> A:
        """Register `device` with `labels` and its report key, write its agent's config (labels
        `agent_labels`, default `labels`), run `before_start(agent)`, and start it unless told not."""
        self.service.store.devices.create(device, labels, {}, device, "$7$unused", "test")
        agent = write_agent_config(device, self.root / "devices" / device,
                                   self.settings.repo_dir / "metadata" / "1.root.json", self.broker.port,
                                   labels if agent_labels is None else agent_labels, self.agent_cls,
                                   topic_prefix=self.settings.topic_prefix)
        if before_start is not None:
            before_start(agent)
        # as `agent enroll` does
        self.device_keys[device] = DeviceKey(device).register(self.service.store).install(agent.state_dir)
        self.agents[device] = agent
        if start:
            agent.start()
        return agent

    def create_rollout(self, version: str, selector: str, strategy: dict[str, Any],
                       thresholds: dict[str, float] | None = None) -> str:
        """`POST /v1/rollouts` of `mlp:<version>` (201 asserted); the rollout id."""
        body: dict[str, Any] = {"model_version_id": f"mlp:{version}", "selector": selector,
                                "strategy": strategy}
        if thresholds is not None:
            body["thresholds"] = thresholds
        with self.api as c:
            res = c.post("/v1/rollouts", json=body)
        assert res.status_code == 201, res.text
        return str(res.json()["id"])

    def status(self, rid: str) -> dict[str, Any]:
        with self.api as c:
            return rollout_status(c, rid)

    def wait_rollout(self, rid: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            s = self.status(rid)
            return s if s["state"] == state else None

        out: dict[str, Any] = wait_until(done, timeout, f"rollout {rid} {state} (now {self.status(rid)})\n"
                                         + self.logs())
        return out

    def reported(self, device: str) -> dict[str, Any]:
        return self.service.store.devices.get(device).reported_state or {}

    def serving(self, device: str) -> str | None:
        """The bundle `device` last reported active while idle (None while it is busy)."""
        state = self.reported(device)
        return state.get("active_bundle") if state.get("state") == "idle" else None

    def logs(self) -> str:
        return agent_logs(self.agents, self.LOG_LINES)

    def close(self) -> None:
        """Stop the agents still running, the service and the broker."""
        for a in self.agents.values():
            if a.proc is not None and a.proc.poll() is None:
                a.stop()
        self.service.stop()
        self.broker.stop()
