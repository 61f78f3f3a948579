"""The lifecycle's context: its configuration, collaborators and the record the handlers work on.

`LifecycleContext` is what every state handler (`install.py`, `activation.py`) gets: the state
record, the slots, the model holder, the trust client and the injected clock, plus the few
helpers the handlers share (`load_checked`, `target_ref_of`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.contract.bundle import extract_bundle
from agent.contract.director import TargetRef
from agent.contract.manifest import Manifest
from agent.errors import (
    MisuseError,
)
from agent.lifecycle.health import fmt_measurements, run_with_deadline
from agent.lifecycle.resources import ResourcePolicy, ResourceProbe, probe_system
from agent.lifecycle.slots import Extracted, SlotBundle, Slots
from agent.lifecycle.state_store import DesiredTarget, StateRecord
from agent.logs import log_event
from agent.runtimes import load_model
from agent.serving.model_holder import LoadedModel, ModelHolder

log = logging.getLogger(__name__)


class TrustSource(Protocol):
    """`agent.trust.client.TrustClient`: refresh metadata, then download a verified target."""

    def download_target(self, target_path: str, expected: TargetRef | None = None) -> Path: ...


class ExtractFn(Protocol):
    """`agent.contract.bundle.extract_bundle` (only the arguments used here)."""

    def __call__(
        self,
        bundle: Path,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        expected_length: int | None = None,
    ) -> Extracted: ...


ModelLoader = Callable[[Path, Manifest, int], LoadedModel]
#: Reports one lifecycle event: (name, fields). The daemon publishes these over MQTT.
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class LifecycleConfig:
    """Limits of the lifecycle (all explicit; see docs/lifecycle.md)."""

    state_dir: Path
    runtime_threads: int = 1
    load_timeout_s: float = 30.0  # first load + warm-up of a new model
    max_entries: int = 3  # entries into one state for one bundle before a forced rollback
    max_crash_recoveries: int = 3
    retry_base_s: float = 5.0  # download retry backoff: base * 2**failures, capped
    retry_max_s: float = 600.0
    probation_poll_s: float = 0.01
    probation_max_wait_s: float | None = None  # default: max(10 x probation_seconds, 60 s)
    # Left free beyond an update's own peak, for the state record, events and telemetry.
    disk_reserve_bytes: int = 256 * 1024
    # Maintenance windows without a zone of their own are read in this one (None: UTC).
    timezone: str | None = None
    # Free disk / memory / CPU an update needs before its download and its activation (holds).
    resources: ResourcePolicy = field(default_factory=ResourcePolicy)

    def __post_init__(self) -> None:
        if self.runtime_threads < 1 or self.load_timeout_s <= 0 or self.max_entries < 1:
            raise MisuseError("runtime_threads, load_timeout_s and max_entries must be positive")


def default_loader(model_path: Path, manifest: Manifest, threads: int) -> LoadedModel:
    return load_model(model_path, manifest, threads=threads)


def default_extract(
    bundle: Path, dest: Path, *, expected_sha256: str | None = None, expected_length: int | None = None
) -> Extracted:
    return extract_bundle(bundle, dest, expected_sha256=expected_sha256, expected_length=expected_length)


@dataclass
class LifecycleContext:
    """Everything the handlers touch; `record` is the persisted part."""

    record: StateRecord
    config: LifecycleConfig
    slots: Slots
    holder: ModelHolder
    trust: TrustSource
    emit: EventSink
    load: ModelLoader = default_loader
    extract: ExtractFn = default_extract
    clock: Callable[[], float] = time.time
    wake: threading.Event = field(default_factory=threading.Event)
    rollback_flag: threading.Event = field(default_factory=threading.Event)
    health_failed_at: float | None = None  # perf_counter() when a failure was seen
    shadow_retry_at: float = 0.0  # transport backoff for the shadow download (not persisted)
    probe: ResourceProbe = probe_system  # what is free now (tests inject a device short of memory)
    _pending: DesiredTarget | None = None
    _pending_lock: threading.Lock = field(default_factory=threading.Lock)

    def offer_desired(self, target: DesiredTarget) -> None:
        """Thread-safe hand-off of a new desired target (applied by the next handler)."""
        with self._pending_lock:
            if self._pending is None or target.sequence > self._pending.sequence:
                self._pending = target
        self.wake.set()

    def superseding(self, bundle_id: str) -> DesiredTarget | None:
        """The pending desired target if it is newer than the applied one and names another bundle."""
        with self._pending_lock:
            target = self._pending
        if target is None or target.sequence <= self.record.director_sequence:
            return None
        return None if target.bundle_id == bundle_id else target

    def apply_pending(self) -> None:
        with self._pending_lock:
            target, self._pending = self._pending, None
        r = self.record
        if target is None or target.sequence <= r.director_sequence:
            return
        r.desired = target
        r.director_sequence = target.sequence
        r.attempts.clear()
        r.download_failures = 0
        r.retry_at = 0.0

    def report(self, name: str, **fields: Any) -> None:
        fields.setdefault("active", self.record.active)
        log_event(log, f"lifecycle.{name}", **{k: v for k, v in fields.items() if not isinstance(v, dict)})
        try:
            self.emit(name, fields)
        except Exception:  # a broken sink must not break the lifecycle
            log.exception("event sink failed for %s", name)

    def fail(self, reason: str, measurements: dict[str, float] | None = None) -> None:
        self.record.last_error = reason
        self.record.last_measurements = fmt_measurements(measurements or {})
        self.health_failed_at = time.perf_counter()

    def previous_serving(self) -> None:
        """Record how long it took from the failure to the previous model serving again."""
        if self.health_failed_at is not None:
            served_at = max(self.holder.last_swap_at, self.health_failed_at)  # the reference swap
            elapsed = (served_at - self.health_failed_at) * 1000.0
            self.record.last_measurements["rollback_ms"] = round(elapsed, 3)


def load_checked(ctx: LifecycleContext, slot: SlotBundle) -> LoadedModel:
    """Re-hash, load and warm a slot's model under the watchdog."""
    ctx.slots.verify_model(slot)
    timeout = max(ctx.config.load_timeout_s, slot.manifest.health.inference_timeout_s)
    threads = ctx.config.runtime_threads
    return run_with_deadline(lambda: ctx.load(slot.model_path, slot.manifest, threads), timeout, "load")


def target_ref_of(d: DesiredTarget) -> TargetRef:
    return TargetRef(path=d.path, length=d.length, sha256=d.sha256, name=d.name, version=d.version)
