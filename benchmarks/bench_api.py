"""Admin API latency with 10,000 devices stored, through a real uvicorn server and httpx.

Baselines measured in the same run: `/health` (no auth, no database) is the HTTP floor,
`/v1/whoami` adds authentication (one indexed key lookup).
"""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from fleet.access.auth import create_api_key
from fleet.db.paging import encode_cursor
from fleet.service import FleetService
from fleet.settings import FleetSettings

NAME = "api"
DESCRIPTION = "fleet API p50/p99: list a device page, rollout status, no-op baseline (10k devices)"
DEVICES = 10_000
REQUESTS = 400
WARMUP = 30
SELECTOR = "env%3Dprod%2Cregion%20in%20(eu%2Cus)"  # env=prod,region in (eu,us)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seed(service: FleetService) -> str:
    store = service.store
    now = store.now()
    regions = ("eu", "us", "ap")
    rows = [{"id": f"dev-{i:06d}", "labels": json.dumps({"env": "prod" if i % 4 else "dev",
                                                         "region": regions[i % 3]}),
             "agent_version": "0.1.0", "runtimes": '["onnx"]', "architecture": "aarch64", "memory_mb": 512,
             "last_seen": now, "online": 1, "reported_state": json.dumps({"slot": "a", "model": "m:1.0.0"}),
             "revoked": 0, "enrolled_at": now, "broker_username": f"dev-{i:06d}",
             "broker_password_hash": "$7$101$x$y"} for i in range(DEVICES)]
    with store.tx() as db:
        db.insert("devices", rows)
    store.models.create_model("bench", "", "bench")
    store.models.register_version("bench", "1.0.0", "sha256:" + "0" * 64, "onnx", {}, "bench")
    rollout = store.rollouts.create("bench:1.0.0", "env=prod", {}, {}, "bench")
    statuses = ("assigned", "downloading", "succeeded", "failed")
    with store.tx() as db:
        db.insert("rollout_devices",
                  [{"rollout_id": rollout.id, "device_id": r["id"], "stage": 1, "status": statuses[i % 4],
                    "updated_at": now} for i, r in enumerate(rows)])
    return str(rollout.id)


def _measure(client: httpx.Client, url: str, headers: dict[str, str]) -> tuple[float, float]:
    for _ in range(WARMUP):
        client.get(url, headers=headers).raise_for_status()
    samples = []
    for _ in range(REQUESTS):
        t0 = time.perf_counter()
        client.get(url, headers=headers).raise_for_status()
        samples.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), q[98]


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = FleetSettings(data_dir=Path(tmp), port=_free_port())
        service = FleetService(settings)
        rollout_id = _seed(service)
        _, key = create_api_key(service.store, "bench", "viewer", "bench")
        service.start_background()
        try:
            base = f"http://127.0.0.1:{settings.port}"
            auth = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=base, timeout=10) as client:
                out: dict[str, float] = {}
                for name, url, headers in (
                    ("noop", "/health", {}),
                    ("auth_noop", "/v1/whoami", auth),
                    ("list", "/v1/devices?limit=50", auth),
                    ("list_selector", f"/v1/devices?limit=50&selector={SELECTOR}", auth),
                    ("list_deep_page", f"/v1/devices?limit=50&cursor={_cursor('dev-009000')}", auth),
                    ("rollout_status", f"/v1/rollouts/{rollout_id}/status", auth),
                ):
                    p50, p99 = _measure(client, url, headers)
                    out[f"api_{name}_p50_ms"] = p50
                    out[f"api_{name}_p99_ms"] = p99
                check = client.get("/v1/devices?limit=50", headers=auth).json()
                assert len(check["items"]) == 50 and check["next_cursor"]
                out["api_devices_stored"] = float(service.store.devices.count())
        finally:
            service.stop()
    return out


def _cursor(last_id: str) -> str:
    return encode_cursor(last_id)
