"""What the rollout controller needs of its collaborators, and its configuration.

Kept apart from `fleet.rollouts.controller` so that the slices that share these ports (the A/B
experiment driver, revocation, the controller's `dispatch` and `event_intake` parts) import them
without the controller; callers import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from agent.contract.director import DeltaRef, TargetRef
from agent.contract.windows import UpdateWindows
from fleet.errors import FleetInputError


class DesiredPublisher(Protocol):
    """What the controller needs of `fleet.delivery.publisher.Publisher`."""

    def publish_desired(self, device_id: str | None = None, cohort: str | None = None, *,
                        document: bytes) -> str: ...


class TargetSource(Protocol):
    """What the controller needs of `fleet.trust.repository.Repository`."""

    def target_ref(self, target_path: str) -> TargetRef: ...

    def load(self, role: str) -> Any: ...


class Leadership(Protocol):
    """What the controller needs of `fleet.cluster.leader.LeaderElector`."""

    def is_leader(self) -> bool: ...

    def fence(self) -> int: ...


class _Always:
    def is_leader(self) -> bool:
        return True

    def fence(self) -> int:
        return 0


class DirectorIssuer(Protocol):
    def issue(self, target: TargetRef, device_id: str | None = None, cohort: str | None = None,
              shadow: TargetRef | None = None, ttl: timedelta = ..., rollout_id: str | None = None,
              reason: str = "", delta: DeltaRef | None = None,
              windows: UpdateWindows | None = None) -> bytes: ...

    def issue_many(self, target: TargetRef, device_ids: list[str], shadow: TargetRef | None = None,
                   ttl: timedelta = ..., rollout_id: str | None = None, reason: str = "",
                   deltas: dict[str, DeltaRef] | None = None,
                   windows: dict[str, UpdateWindows] | None = None) -> list[bytes]: ...


class DeltaSource(Protocol):
    """What the controller needs of `fleet.registry.deltas.DeltaCatalog` (or `DeltaBuilds`)."""

    def for_devices(self, full: TargetRef, index: dict[str, TargetRef],
                    active_bundles: list[str | None]) -> dict[str, DeltaRef] | None:
        """Base bundle id -> delta; None while they are still being built (assign later)."""


@dataclass(frozen=True)
class ControllerConfig:
    """Tick period (and the least pause between ticks), the actor name in the audit log,
    tolerated device clock skew, document TTL."""

    tick_s: float = 0.5
    min_tick_gap_s: float = 0.1  # capped at tick_s; see `RolloutController.__init__`
    actor: str = "controller"
    clock_skew_s: float = 5.0
    document_ttl: timedelta = timedelta(days=7)
    max_events: int = 100_000

    def __post_init__(self) -> None:
        if not 0.01 <= self.tick_s <= 3600:
            raise FleetInputError("controller tick_s must be within 0.01..3600 s")
        if not 0 <= self.min_tick_gap_s <= 3600:
            raise FleetInputError("controller min_tick_gap_s must be within 0..3600 s")
