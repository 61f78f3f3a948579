"""Site policies of a rollout: disruption budgets, approval gates, success thresholds, windows.

They are parts of the rollout's `strategy` document (`StrategyConfig.budget`, `.approval`,
`.success_threshold_pct`, `.windows`), validated here, and the decisions over them are pure
functions the controller calls:

- a **disruption budget** groups the cohort by labels (`group_by: [site]`) and bounds how
  many devices of each group may be *unavailable* (assigned, no outcome yet: downloading,
  installing, in probation, waiting for a window or held) at once: `max_unavailable` (a
  count or `N%` of the group, rounded up) and/or `min_available` (the group size minus the
  devices in flight). `admit` picks which waiting devices may start now; `starved_groups`
  names the groups a budget could never let progress (Flight Control's issue 892:
  `minAvailable` at or above the group size starved the whole group), which creation refuses;
- **approval** names the stages that wait for an operator before they start
  (`awaiting_approval`), with a timeout that pauses or aborts;
- **windows** (rollout-wide, overridden per label group) are resolved per device into the
  `agent.contract.windows.UpdateWindows` its signed director document carries.

Errors: `PolicyError` (a `FleetInputError` with the field path) from the checks that need
the cohort; the models raise pydantic's `ValidationError` like the rest of the strategy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.contract.windows import UpdateWindows, Window, check_cron, zone, zone_of_labels
from fleet.errors import FleetInputError
from fleet.rollouts.gates import Breach, OutcomeCounts

#: Strategy fields this module owns: a bad one is refused with 400 naming the field.
POLICY_FIELDS = ("budget", "approval", "success_threshold_pct", "windows", "window_timeout_s")
#: The group of devices that lack one of the `group_by` labels.
NO_LABEL = "(none)"
LabelKey = Annotated[str, Field(min_length=1, max_length=253)]


class PolicyError(FleetInputError):
    """A policy that cannot work with this cohort; `loc` is the field path in the request."""

    def __init__(self, loc: Sequence[str | int], msg: str) -> None:
        super().__init__(msg)
        self.loc = tuple(loc)


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DisruptionBudget(_Policy):
    """At most so many devices of each label group unavailable at once."""

    group_by: Annotated[list[LabelKey], Field(min_length=1, max_length=4)]
    max_unavailable: Annotated[int, Field(ge=0, le=1_000_000)] | Annotated[
        str, Field(pattern=r"^(100|[1-9]?[0-9])%$")] | None = None
    min_available: Annotated[int, Field(ge=0, le=1_000_000)] | None = None

    @model_validator(mode="after")
    def _progresses(self) -> DisruptionBudget:
        if self.max_unavailable is None and self.min_available is None:
            raise ValueError("a budget needs max_unavailable or min_available")
        if self.max_unavailable in (0, "0%"):
            raise ValueError("max_unavailable 0 would never let a device of any group update")
        return self

    def allowed(self, group_size: int) -> int:
        """Devices of a group of `group_size` that may be unavailable at once."""
        limits = [group_size]
        if isinstance(self.max_unavailable, str):
            limits.append(math.ceil(int(self.max_unavailable[:-1]) * group_size / 100))
        elif self.max_unavailable is not None:
            limits.append(self.max_unavailable)
        if self.min_available is not None:
            limits.append(group_size - self.min_available)
        return max(0, min(limits))

    def group_of(self, labels: Mapping[str, str]) -> str:
        """The group key of a device: its `group_by` label values (`(none)` for a missing one)."""
        return ",".join(f"{k}={labels[k]}" if k in labels else f"{k}={NO_LABEL}" for k in self.group_by)


def starved_groups(budget: DisruptionBudget, sizes: Mapping[str, int]) -> list[str]:
    """Groups (with their sizes) in which the budget lets no device start, ever."""
    return sorted(f"{g} ({n} devices)" for g, n in sizes.items() if n > 0 and budget.allowed(n) <= 0)


def admit(budget: DisruptionBudget | None, waiting: Sequence[tuple[str, str]], sizes: Mapping[str, int],
          in_flight: Mapping[str, int], quota: int) -> list[str]:
    """Which `waiting` devices (id, group), in their order, may start now: at most `quota`, and
    no group beyond its budget counting the devices already in flight there."""
    if quota <= 0:
        return []
    if budget is None:
        return [d for d, _ in waiting[:quota]]
    busy = Counter(in_flight)
    out: list[str] = []
    for dev, group in waiting:
        if len(out) >= quota:
            break
        if busy[group] < budget.allowed(sizes.get(group, 0)):
            busy[group] += 1
            out.append(dev)
    return out


class ProgressRow(Protocol):
    """What `admit_rows` reads of a device's progress (`fleet.rollouts.records.DeviceProgress`)."""

    @property
    def device_id(self) -> str: ...
    @property
    def assigned_at(self) -> float | None: ...
    @property
    def outcome(self) -> str | None: ...


R = TypeVar("R", bound=ProgressRow)


def admit_rows(budget: DisruptionBudget | None, rows: Sequence[R], labels: Mapping[str, Mapping[str, str]],
               quota: int) -> list[R]:
    """The cohort's unassigned rows that may start now: `quota` of them, within each group's budget
    (devices assigned without an outcome yet are the unavailable ones)."""
    waiting = [r for r in rows if r.assigned_at is None]
    if budget is None:
        return waiting[:max(0, quota)]
    group = {r.device_id: budget.group_of(labels.get(r.device_id, {})) for r in rows}
    in_flight = Counter(group[r.device_id] for r in rows if r.assigned_at is not None and r.outcome is None)
    chosen = set(admit(budget, [(r.device_id, group[r.device_id]) for r in waiting],
                       Counter(group.values()), in_flight, quota))
    return [r for r in waiting if r.device_id in chosen]


class ApprovalPolicy(_Policy):
    """Stages (0-based) that wait for an operator's approval before they start."""

    stages: Annotated[list[Annotated[int, Field(ge=0, le=19)]], Field(min_length=1, max_length=20)]
    timeout_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 86400.0
    on_timeout: Literal["pause", "abort"] = "pause"


def needs_approval(policy: ApprovalPolicy | None, stage: int, approved_stage: int) -> bool:
    """The stage waits for an approval: the policy names it and it was not approved yet."""
    return policy is not None and stage in policy.stages and approved_stage < stage


def success_breach(threshold_pct: float | None, stage: int, counts: OutcomeCounts) -> Breach | None:
    """The stage's success threshold as a gate: too few of the devices with a verdict committed
    to move on (devices that missed their window are not counted either way)."""
    if threshold_pct is None or counts.finished <= 0:
        return None
    pct = 100.0 * counts.succeeded / counts.finished
    if pct >= threshold_pct:
        return None
    return Breach("success_pct", pct, threshold_pct, f"{counts.succeeded} of {counts.finished} devices "
                  f"committed ({pct:.1f} % < {threshold_pct} % needed to advance stage {stage})")


class WindowSpec(_Policy):
    """`agent.contract.windows.Window` as the API takes it."""

    cron: Annotated[str, Field(min_length=9, max_length=128)]
    duration_s: Annotated[int, Field(ge=60, le=7 * 86400)]

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        check_cron(value)
        return value


class WindowSet(_Policy):
    """Download and activation windows; `tz` None = each device's zone (`tz` label or its config)."""

    download: WindowSpec | None = None
    activation: WindowSpec | None = None
    tz: Annotated[str, Field(max_length=64)] | None = None

    @field_validator("tz")
    @classmethod
    def _tz(cls, value: str | None) -> str | None:
        zone(value)
        return value


class GroupWindows(WindowSet):
    """Windows for the devices whose labels include every pair of `match`."""

    match: Annotated[dict[LabelKey, Annotated[str, Field(max_length=63)]], Field(min_length=1, max_length=8)]


class WindowPolicy(WindowSet):
    """Rollout-wide windows, then per label group overrides (the first matching group wins)."""

    groups: Annotated[list[GroupWindows], Field(max_length=100)] = []


def windows_for(policy: WindowPolicy | None, labels: Mapping[str, str]) -> UpdateWindows | None:
    """The windows one device's director document carries (None: no window at all).

    A group's own download/activation window replaces the rollout-wide one; the zone is the
    group's or the rollout's explicit `tz`, else the device's `tz` label (`tz=Europe.Berlin`),
    else None (the agent then uses its configured zone).
    """
    if policy is None:
        return None
    group = next((g for g in policy.groups if all(labels.get(k) == v for k, v in g.match.items())), None)
    download = (group.download if group and group.download else None) or policy.download
    activation = (group.activation if group and group.activation else None) or policy.activation
    if download is None and activation is None:
        return None
    tz = (group.tz if group else None) or policy.tz or zone_of_labels(labels)
    return UpdateWindows(download=_window(download), activation=_window(activation), tz=tz)


def _window(spec: WindowSpec | None) -> Window | None:
    return Window(cron=spec.cron, duration_s=spec.duration_s) if spec is not None else None


def check_cohort_policies(budget: DisruptionBudget | None, windows: WindowPolicy | None,
                          cohort: Iterable[tuple[str, Mapping[str, str]]]) -> None:
    """Refuse policies this cohort (device id, labels) can never satisfy: a budget group that
    could never progress, or a device whose `tz` label names no time zone a window could use.
    Raises `PolicyError`."""
    devices = list(cohort)
    if budget is not None:
        starved = starved_groups(budget, Counter(budget.group_of(labels) for _, labels in devices))
        if starved:
            raise PolicyError(("body", "strategy", "budget"), (
                f"the budget can never let these groups progress: {', '.join(starved[:10])} "
                "(min_available must be below the group size and max_unavailable above 0)"))
    if windows is not None:
        for dev, labels in devices:
            tz = zone_of_labels(labels)
            if tz is None:
                continue
            try:
                zone(tz)
            except ValueError:
                raise PolicyError(("body", "strategy", "windows"), (
                    f"device {dev} has the label tz={labels['tz']!r}, which names no time zone "
                    f"({tz!r}; write Europe/Berlin as tz=Europe.Berlin)")) from None
