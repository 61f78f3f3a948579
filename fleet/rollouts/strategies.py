"""How many devices a rollout may have assigned at a given moment: pure strategy arithmetic.

Three strategies, all functions of the cohort size and an injected clock (no I/O):

- `all_at_once`: one stage with the whole cohort; no bake unless `bake_s` is given (there is
  no next stage to protect, so the default 600 s would only delay `completed`).
- `canary`: cumulative percentages (default 5 % -> 25 % -> 100 %), each stage baked for
  `bake_s` once all its devices have a final outcome and its gates pass (hawkBit groups).
- `exponential`: AWS IoT Jobs' rollout rate: start at `base_per_minute`, multiply by
  `increment_factor` each time another `increase_after_succeeded` devices succeed (or
  `increase_after_notified` are notified), never above `max_per_minute`. One stage.

Why cumulative counts rather than device lists: devices that enroll after the start and match
the selector join the cohort; the stage's count is recomputed from the current cohort size,
so a late device is assigned as soon as its stage's share allows it.

The site policies (disruption budget, approval, success threshold, windows) are fields of
the same document; their models and decisions live in `fleet.rollouts.policies`.

Errors: `StrategyConfig.parse` raises `FleetInputError` naming the bad field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleet.errors import FleetInputError
from fleet.rollouts.policies import ApprovalPolicy, DisruptionBudget, WindowPolicy

DEFAULT_CANARY_STAGES = (5.0, 25.0, 100.0)
MINUTE_S = 60.0


class StrategyConfig(BaseModel):
    """A rollout's `strategy` document, validated (every field has a bound and a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["all_at_once", "canary", "exponential"] = "canary"
    stages: Annotated[list[Annotated[float, Field(gt=0, le=100)]], Field(min_length=1, max_length=20)] = \
        Field(default_factory=lambda: list(DEFAULT_CANARY_STAGES))
    bake_s: Annotated[float, Field(ge=0, le=30 * 86400)] = 600.0  # all_at_once: 0 unless given
    # exponential rate (AWS IoT Jobs names)
    base_per_minute: Annotated[int, Field(ge=1, le=1000)] = 10
    increment_factor: Annotated[float, Field(ge=1.1, le=5.0)] = 2.0
    increase_after_succeeded: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    increase_after_notified: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    max_per_minute: Annotated[int, Field(ge=1, le=1000)] = 1000
    # per device and on a breach
    device_timeout_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 1800.0
    revert_timeout_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 1800.0
    on_breach: Literal["pause", "abort"] = "pause"
    include_late_devices: bool = True
    shadow_model_version_id: Annotated[str, Field(max_length=200)] | None = None
    # site policies (fleet/rollouts/policies.py)
    budget: DisruptionBudget | None = None
    approval: ApprovalPolicy | None = None
    success_threshold_pct: Annotated[float, Field(gt=0, le=100)] | Annotated[
        list[Annotated[float, Field(ge=0, le=100)]], Field(min_length=1, max_length=20)] | None = None
    windows: WindowPolicy | None = None
    window_timeout_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 86400.0  # then `window_missed`

    @model_validator(mode="after")
    def _consistent(self) -> StrategyConfig:
        if any(b <= a for a, b in zip(self.stages, self.stages[1:], strict=False)):
            raise ValueError("stages must be strictly increasing cumulative percentages")
        if self.stages[-1] != 100:
            raise ValueError("the last stage must be 100 (the whole cohort)")
        if self.max_per_minute < self.base_per_minute:
            raise ValueError("max_per_minute must be at least base_per_minute")
        stages = len(self.stages) if self.kind == "canary" else 1
        if self.approval is not None and max(self.approval.stages) >= stages:
            raise ValueError(f"approval.stages must name stages 0..{stages - 1} of this strategy")
        if isinstance(self.success_threshold_pct, list) and len(self.success_threshold_pct) != stages:
            raise ValueError(f"success_threshold_pct as a list needs one value per stage ({stages})")
        if self.kind == "all_at_once" and "bake_s" not in self.model_fields_set:
            return self.model_copy(update={"bake_s": 0.0})  # one stage: nothing to bake before
        if self.kind == "exponential" and self.increase_after_succeeded is None \
                and self.increase_after_notified is None:
            return self.model_copy(update={"increase_after_notified": self.base_per_minute})
        return self

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> StrategyConfig:
        """Validate a stored/posted strategy dict. Raises FleetInputError naming each bad field."""
        try:
            return cls.model_validate(raw or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'strategy'}: {e['msg']}"
                                 for e in exc.errors())
            raise FleetInputError(f"invalid rollout strategy: {problems}") from None

    def success_threshold(self, stage: int) -> float | None:
        """The committed percentage `stage` needs before the rollout moves on (None: no threshold)."""
        t = self.success_threshold_pct
        if isinstance(t, list):
            return t[min(max(stage, 0), len(t) - 1)] or None
        return t

    @property
    def stage_percents(self) -> tuple[float, ...]:
        """Cumulative percentages of the stages this strategy walks through."""
        return tuple(self.stages) if self.kind == "canary" else (100.0,)


def stage_count(cfg: StrategyConfig) -> int:
    return len(cfg.stage_percents)


def stage_target(cfg: StrategyConfig, stage: int, cohort_size: int) -> int:
    """Devices that may be assigned (cumulatively) while in `stage` (0-based).

    At least one device per stage when the cohort is not empty, never more than the cohort,
    and the last stage is always the whole cohort.
    """
    if cohort_size <= 0:
        return 0
    pcts = cfg.stage_percents
    stage = min(max(stage, 0), len(pcts) - 1)
    if stage == len(pcts) - 1:
        return cohort_size
    return min(cohort_size, max(1, math.ceil(pcts[stage] / 100.0 * cohort_size - 1e-9)))


def exponential_rate(cfg: StrategyConfig, notified: int, succeeded: int) -> float:
    """Devices per minute allowed now: base x factor^k, k = criteria met so far, capped."""
    if cfg.increase_after_succeeded is not None:
        steps = succeeded // cfg.increase_after_succeeded
    else:
        steps = notified // (cfg.increase_after_notified or cfg.base_per_minute)
    rate = cfg.base_per_minute * cfg.increment_factor ** min(steps, 64)
    return float(min(cfg.max_per_minute, rate))


def dispatch_quota(
    cfg: StrategyConfig,
    stage: int,
    cohort_size: int,
    assigned: int,
    now: float,
    recent_assignments: Sequence[float],
    succeeded: int,
) -> int:
    """How many more devices to assign right now (never negative).

    `recent_assignments` are the clock times of assignments (only the last minute matters);
    for `exponential` the per-minute rate bounds them, for the others only the stage target.
    """
    room = stage_target(cfg, stage, cohort_size) - assigned
    if room <= 0:
        return 0
    if cfg.kind != "exponential":
        return room
    in_last_minute = sum(1 for t in recent_assignments if now - t < MINUTE_S)
    rate = exponential_rate(cfg, assigned, succeeded)
    return max(0, min(room, math.floor(rate) - in_last_minute))


def stage_ready_to_advance(
    cfg: StrategyConfig, now: float, stage_done_at: float | None
) -> bool:
    """True once every device of the stage is final and the bake time has passed since."""
    return stage_done_at is not None and now - stage_done_at >= cfg.bake_s
