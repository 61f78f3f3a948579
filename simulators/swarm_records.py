"""The records a swarm's controller (`simulators.swarm.Swarm`) and its worker processes exchange.

Their own module because both sides need them and neither should import the other's machinery:
`SwarmSpec` is what every worker is started with (pickled into the spawned process, so it holds
only plain values and paths), `WorkerStats` what a worker answers to `stats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulators.datagen import Schema, default_schema


@dataclass(frozen=True)
class SwarmSpec:
    """Where the swarm connects and how its devices behave (times in seconds)."""

    broker_host: str
    broker_port: int
    prefix: str
    bootstrap_root: Path
    state_root: Path
    schema: Schema = field(default_factory=default_schema)
    telemetry_interval_s: float = 2.0
    traffic_interval_s: float = 0.5
    traffic_batch: int = 16
    traffic: bool = True
    seed: int = 0
    agent_overrides: dict[str, Any] = field(default_factory=dict)
    start_timeout_s: float = 120.0
    # Ground truth for quality: labels are the argmax of `simulators.models.mlp_reference` with
    # this seed's weights; each served batch's accuracy is kept per bundle (A/B experiments).
    truth_seed: int | None = None


@dataclass(frozen=True)
class WorkerStats:
    worker: int
    pid: int
    devices: int
    connected: int
    rss_mb: float
    base_rss_mb: float  # the worker's RSS before its first device (imports, runtimes)
    sessions: int  # distinct loaded model sessions
    session_loads: int
    predictions: int
    setup_s: float
