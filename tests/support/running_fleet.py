"""A real `FleetService` (uvicorn on a free loopback port, TUF repository made) for CLI tests.

The operator CLI and `agent enroll` talk HTTP to it exactly as they would to `fleet serve`;
no broker and no components, so rollouts stay `pending` and enrollment's broker reload is
reported as not done.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fleet.access.auth import create_api_key
from fleet.components import ensure_trust
from fleet.service import FleetService
from fleet.settings import FleetSettings, Limits
from tests.support.broker import free_port


@dataclass
class RunningFleet:
    url: str
    settings: FleetSettings
    service: FleetService
    keys: dict[str, str]  # role -> API key (admin made like `fleet create-admin-key`, others via the API)

    def env(self, role: str = "operator", **extra: str) -> dict[str, str]:
        """Environment for a CLI call as `role`, with no config file from the real home directory."""
        return {"EDGEFLEET_URL": self.url, "EDGEFLEET_API_KEY": self.keys[role], "EDGEFLEET_CONFIG": "",
                "XDG_CONFIG_HOME": str(self.settings.data_dir / "no-config-home"), **extra}


@contextmanager
def running_fleet(data_dir: Path, page_size: int = 2, **overrides: Any) -> Iterator[RunningFleet]:
    """Serve a fresh fleet; a small default page size makes every list page through cursors.

    `overrides` are further `FleetSettings` fields (e.g. `broker_url` handed to enrolling devices).
    """
    settings = FleetSettings(data_dir=data_dir, port=free_port(),
                             limits=Limits(default_page_size=page_size, max_page_size=50), **overrides)
    ensure_trust(settings)
    service = FleetService(settings)
    admin = create_api_key(service.store, "bootstrap-admin", "admin", "cli:create-admin-key")[1]
    service.start_background()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        keys = {"admin": admin}
        for role in ("operator", "viewer"):
            res = httpx.post(f"{url}/v1/api-keys", json={"name": role, "role": role},
                             headers={"Authorization": f"Bearer {admin}"}, timeout=30)
            assert res.status_code == 201, res.text
            keys[role] = res.json()["key"]
        yield RunningFleet(url, settings, service, keys)
    finally:
        service.stop()
