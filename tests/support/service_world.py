"""The end-to-end tests' fleet: a real `fleet serve` (FleetService with its MQTT components) in
this process, and the operator's view of it over HTTP.

Every e2e test that runs real agents against a real fleet starts the service and talks to its
API the same way; these are those pieces, once.
"""

from __future__ import annotations

from typing import Any

import httpx

from fleet.components import ServeConfig, build_components
from fleet.service import FleetService
from fleet.settings import FleetSettings


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
