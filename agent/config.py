"""`AgentConfig`: everything `edgefleet agent run` needs, from one JSON file, with explicit limits.

Why one typed file: a device is provisioned once (enrollment writes the file and the trusted
`root.json` next to it) and then runs unattended, so every bound the agent enforces (bundle
size, chunk size, timeouts, queue sizes) is visible and checked at start instead of being a
constant buried in code. Unknown keys are refused (a typo must not silently fall back to a
default). Lines whose first non-blank characters are `//` are comments (`init-config` writes a
commented example), everything else is plain JSON.

Errors: `load_config` raises `agent.errors.ConfigError` naming the file and the bad field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

from agent.contract.protocol import DEFAULT_CHUNK_SIZE, ID_RE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, validate_prefix
from agent.contract.strict import Meta, StrictStruct, ValidationError, describe, field
from agent.contract.windows import zone
from agent.errors import ConfigError, MisuseError
from agent.transport.mqtt_config import MqttConfig

MAX_CONFIG_BYTES = 256 * 1024
_ID_RULE = "use 1-64 of [A-Za-z0-9._-], starting alphanumeric"  # device ids and cohorts
_COMMENT_LINE = re.compile(r"^\s*//.*$", re.MULTILINE)


class LocalApiConfig(StrictStruct, frozen=True, kw_only=True):
    """The local inference API. HTTP binds to loopback only unless `allow_remote` is set."""

    http_enabled: bool = True
    http_host: str = "127.0.0.1"  # only 127.0.0.1/::1/localhost unless allow_remote
    http_port: Annotated[int, Meta(ge=0, le=65535)] = 8780  # 0 = any free port
    allow_remote: bool = False  # explicitly opt in to binding a non-loopback address
    unix_enabled: bool = True
    unix_socket: Path = Path("/run/edgefleet/agent.sock")
    max_body_bytes: Annotated[int, Meta(ge=1024, le=256 * 1024 * 1024)] = 8 * 1024 * 1024
    max_batch: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096
    # Labels sent later (`POST /v1/feedback`) match predictions remembered in a bounded ring.
    feedback_capacity: Annotated[int, Meta(ge=1, le=10_000_000)] = 65536  # rows remembered (~26 B each)
    feedback_horizon_s: Annotated[float, Meta(gt=0, le=30 * 86400)] = 86400.0  # later labels expire
    # Micro-batching of concurrent Unix-socket predicts (agent/serving/batch_loop.py): None = off
    # (a thread per connection); a number = one event loop, waiting that long for more requests.
    unix_batch_window_us: Annotated[float, Meta(ge=0, le=10_000)] | None = None
    unix_batch_max_rows: Annotated[int, Meta(ge=1, le=4096)] = 64
    # Shared-memory channels for Unix-socket clients in other processes (agent/serving/shm_server.py;
    # x86-64 Linux only): the poller spins this long after the last request before it sleeps.
    unix_shm: bool = True
    unix_shm_spin_us: Annotated[float, Meta(ge=0, le=100_000)] = 300.0

    def _check(self) -> None:
        if (
            self.http_enabled
            and not self.allow_remote
            and self.http_host not in ("127.0.0.1", "::1", "localhost")
        ):
            raise ValueError(
                f"http_host {self.http_host!r} is not loopback; set allow_remote=true to bind it"
            )


class LimitsConfig(StrictStruct, frozen=True, kw_only=True):
    """Bounds on what an update may cost the device (bytes and seconds)."""

    max_bundle_bytes: Annotated[int, Meta(ge=1024, le=2**40)] = 512 * 1024 * 1024
    chunk_size: Annotated[int, Meta(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)] = DEFAULT_CHUNK_SIZE
    fetch_window: Annotated[int, Meta(ge=1, le=64)] = 4  # chunk requests in flight
    chunk_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 10.0
    chunk_retries: Annotated[int, Meta(ge=0, le=100)] = 5
    fetch_reconnect_wait_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0  # wait for the broker mid-fetch
    # (the largest MQTT message is `mqtt.max_message_bytes`; it must exceed chunk_size + 2 KiB)


class LifecycleOverrides(StrictStruct, frozen=True, kw_only=True):
    """Overrides of the lifecycle's limits (`agent.lifecycle.LifecycleConfig`)."""

    load_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    max_entries: Annotated[int, Meta(ge=1, le=100)] = 3
    max_crash_recoveries: Annotated[int, Meta(ge=1, le=100)] = 3
    retry_base_s: Annotated[float, Meta(gt=0, le=3600)] = 5.0
    retry_max_s: Annotated[float, Meta(gt=0, le=86400)] = 600.0
    probation_max_wait_s: Annotated[float, Meta(gt=0, le=86400)] | None = None
    # Maintenance windows without a zone are read in this IANA zone (else the `tz` label, else UTC).
    timezone: Annotated[str, Meta(max_length=64)] | None = None
    # Resource-aware updates (agent/lifecycle/resources.py): margins beyond a step's need, CPU ceiling,
    # and the backoff of a hold.
    memory_margin_mb: Annotated[float, Meta(ge=0, le=1_000_000)] = 64.0
    disk_margin_mb: Annotated[float, Meta(ge=0, le=1_000_000)] = 16.0
    max_load_per_cpu: Annotated[float, Meta(gt=0, le=1000)] | None = None  # off unless set
    hold_base_s: Annotated[float, Meta(gt=0, le=86400)] = 30.0
    hold_max_s: Annotated[float, Meta(gt=0, le=86400)] = 600.0

    def _check(self) -> None:
        if self.timezone is not None:
            zone(self.timezone)  # ValueError: unknown time zone


class AgentConfig(StrictStruct, frozen=True, kw_only=True):
    """One device's agent (see docs/agent.md for every field)."""

    device_id: str  # also the MQTT client id unless mqtt.client_id says otherwise
    cohorts: Annotated[list[str], Meta(max_length=32)] = field(default_factory=list)
    labels: Annotated[dict[str, str], Meta(max_length=64)] = field(default_factory=dict)
    state_dir: Path = Path("/var/lib/edgefleet")
    bootstrap_root: Path = Path("/etc/edgefleet/root.json")  # trusted TUF root shipped at enrollment
    topic_prefix: str = "edgefleet"
    mqtt: MqttConfig
    api: LocalApiConfig = field(default_factory=LocalApiConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    lifecycle: LifecycleOverrides = field(default_factory=LifecycleOverrides)
    model_threads: Annotated[int, Meta(ge=1, le=64)] = 1
    telemetry_interval_s: Annotated[float, Meta(ge=1, le=86400)] = 60.0
    telemetry_queue_reports: Annotated[int, Meta(ge=2, le=1_000_000)] = 1440
    telemetry_queue_bytes: Annotated[int, Meta(ge=1024, le=1 << 32)] = 8 * 1024 * 1024
    report_interval_s: Annotated[float, Meta(ge=0.1, le=3600)] = 1.0  # state/telemetry ticker period
    watchdog_stall_s: Annotated[float, Meta(ge=1, le=86400)] = 600.0  # longest main-loop step tolerated
    offline_drop_dir: Path | None = None  # offline update files (*.efo) put here are imported

    def _check(self) -> None:
        if not ID_RE.fullmatch(self.device_id):
            raise ValueError(f"device_id: {_ID_RULE}")
        for c in self.cohorts:
            if not ID_RE.fullmatch(c):
                raise ValueError(f"cohort {c!r}: {_ID_RULE}")
        try:
            validate_prefix(self.topic_prefix)
        except MisuseError as exc:
            raise ValueError(str(exc)) from None
        if self.mqtt.max_message_bytes < self.limits.chunk_size + 2048:
            raise ValueError("mqtt.max_message_bytes must exceed limits.chunk_size by at least 2 KiB")


def strip_comments(text: str) -> str:
    """Drop `//` comment lines (only whole lines, so URLs inside strings are safe)."""
    return _COMMENT_LINE.sub("", text)


def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    """Parse config text. Raises `ConfigError` naming `source` and the offending field."""
    try:
        raw: Any = json.loads(strip_comments(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    device_id = raw.get("device_id")
    if isinstance(device_id, str) and not ID_RE.fullmatch(device_id):  # before mqtt.client_id inherits it
        raise ConfigError(f"{source}: device_id: {_ID_RULE}")
    mqtt = raw.get("mqtt")
    if isinstance(mqtt, dict) and "client_id" not in mqtt and isinstance(raw.get("device_id"), str):
        raw["mqtt"] = {**mqtt, "client_id": raw["device_id"]}
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe(exc)}") from None


def load_config(path: Path) -> AgentConfig:
    """Read and validate an agent config file. Raises `ConfigError`."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc}") from None
    return parse_config(text, str(path))


EXAMPLE_CONFIG = """\
// edgefleet agent configuration (JSON; whole lines starting with // are comments).
// Every field is documented in docs/agent.md; omitted fields take the defaults shown.
{
  // This device's id: its MQTT topics are <prefix>/v1/devices/<device_id>/...
  "device_id": "gw-0001",
  // Cohorts whose desired-state documents this device also follows.
  "cohorts": ["eu-west"],
  // Free-form labels reported to the fleet (rollout selectors use them).
  "labels": {"site": "plant-3"},
  // State record, bundle slots, TUF metadata, telemetry queue.
  "state_dir": "/var/lib/edgefleet",
  // The trusted TUF root shipped at enrollment (only used until the first refresh).
  "bootstrap_root": "/etc/edgefleet/root.json",
  "topic_prefix": "edgefleet",
  "mqtt": {
    "host": "127.0.0.1",
    "port": 1883,
    // client_id defaults to device_id; username/password or tls + cert_file/key_file.
    "keepalive_s": 30,
    "reconnect_min_s": 0.2,
    "reconnect_max_s": 30.0,
    "max_message_bytes": 262144
  },
  "api": {
    // HTTP binds to loopback only (set allow_remote to bind anything else).
    "http_enabled": true,
    "http_host": "127.0.0.1",
    "http_port": 8780,
    "unix_enabled": true,
    "unix_socket": "/run/edgefleet/agent.sock",
    "max_body_bytes": 8388608,
    "max_batch": 4096
  },
  "limits": {
    "max_bundle_bytes": 536870912,
    "chunk_size": 65536,
    "fetch_window": 4,
    "chunk_timeout_s": 10.0,
    "chunk_retries": 5,
    "fetch_reconnect_wait_s": 30.0
  },
  "lifecycle": {
    "load_timeout_s": 30.0,
    "max_entries": 3,
    "max_crash_recoveries": 3,
    "retry_base_s": 5.0,
    "retry_max_s": 600.0
  },
  "model_threads": 1,
  // One telemetry report per interval; offline reports queue up to these bounds.
  "telemetry_interval_s": 60.0,
  "telemetry_queue_reports": 1440,
  "telemetry_queue_bytes": 8388608,
  "report_interval_s": 1.0,
  // WATCHDOG=1 stops if one main-loop step (e.g. a download) takes longer than this.
  "watchdog_stall_s": 600.0
}
"""
