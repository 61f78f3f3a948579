"""Where alerts go: a webhook (httpx POST of the alert's JSON) and/or a command fed it on stdin.

Kept apart from the alert manager so that deciding and persisting (fleet/telemetry/alerts.py)
and the I/O of delivery are separate; the manager records the returned errors and retries
(`AlertManager.redeliver`) until they are empty.
"""

from __future__ import annotations

import json
import math
import subprocess
from typing import Any

import httpx


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float as None: receivers parse strict JSON, which has no
    NaN or Infinity (a gate alert has no threshold, an undefined statistic is NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def deliver(body: dict[str, Any], webhook_url: str | None, command: tuple[str, ...], webhook_timeout_s: float,
            command_timeout_s: float, http: httpx.Client | None = None) -> list[str]:
    """Send one alert to every configured destination; the errors (empty: delivered). Never
    raises: a failing destination is an error string for the manager to record and retry."""
    errors: list[str] = []
    body = strict_json(body)
    if webhook_url:
        try:
            client = http or httpx.Client(timeout=webhook_timeout_s)
            try:
                resp = client.post(webhook_url, json=body, timeout=webhook_timeout_s)
                if resp.status_code >= 300:
                    errors.append(f"webhook answered {resp.status_code}")
            finally:
                if http is None:
                    client.close()
        except httpx.HTTPError as exc:
            errors.append(f"webhook: {type(exc).__name__}: {exc}")
    if command:
        try:
            done = subprocess.run(list(command), input=json.dumps(body, allow_nan=False), text=True,
                                  capture_output=True, timeout=command_timeout_s, check=False)
            if done.returncode != 0:
                errors.append(f"command exited {done.returncode}: {done.stderr[-200:]}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"command: {type(exc).__name__}: {exc}")
    return errors
