"""What the agent's config file means for the collaborators the daemon builds.

Kept apart from `agent.daemon.core` so the daemon module stays about wiring: a new lifecycle
knob is one line here and one in `agent.config`, not a change to the composition root.
"""

from __future__ import annotations

from agent.config import AgentConfig
from agent.contract.windows import zone_of_labels
from agent.lifecycle import LifecycleConfig
from agent.lifecycle.resources import ResourcePolicy
from agent.transport.fetcher_config import FetcherConfig


def lifecycle_config(c: AgentConfig) -> LifecycleConfig:
    """The lifecycle's settings: the config's `lifecycle` overrides, the device's time zone
    (from its labels unless set), and its state under `state_dir/lifecycle`."""
    lo = c.lifecycle
    return LifecycleConfig(
        state_dir=c.state_dir / "lifecycle",
        runtime_threads=c.model_threads,
        load_timeout_s=lo.load_timeout_s,
        max_entries=lo.max_entries,
        max_crash_recoveries=lo.max_crash_recoveries,
        retry_base_s=lo.retry_base_s,
        retry_max_s=lo.retry_max_s,
        probation_max_wait_s=lo.probation_max_wait_s,
        timezone=lo.timezone or zone_of_labels(c.labels),
        resources=ResourcePolicy(
            memory_margin_mb=lo.memory_margin_mb,
            disk_margin_mb=lo.disk_margin_mb,
            max_load_per_cpu=lo.max_load_per_cpu,
            hold_base_s=lo.hold_base_s,
            hold_max_s=lo.hold_max_s,
        ),
    )


def fetcher_config(c: AgentConfig) -> FetcherConfig:
    """The MQTT fetcher's settings: chunking, window, timeouts and the largest object taken."""
    return FetcherConfig(
        chunk_size=c.limits.chunk_size,
        window=c.limits.fetch_window,
        chunk_timeout_s=c.limits.chunk_timeout_s,
        chunk_retries=c.limits.chunk_retries,
        reconnect_wait_s=c.limits.fetch_reconnect_wait_s,
        max_object_bytes=c.limits.max_bundle_bytes,
    )
