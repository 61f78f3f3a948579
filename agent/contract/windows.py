"""Maintenance windows: when a device may download and when it may activate an update.

A window is a cron expression (when it opens) and a duration (how long it stays open), read
in the device's time zone. The fleet puts a rollout's windows into the signed director
document (`DirectorDocument.windows`), so they are as trusted as the target itself; the
agent then enforces them with its own clock, which keeps working offline: it may prefetch
and verify the bundle only while the download window is open, and activate it only while
the activation window is open, reporting `waiting_for_window` meanwhile. The fleet uses
the same functions to refuse a malformed expression or an unknown time zone at creation.

Why croniter and not a parser of our own: cron has corners (day-of-month OR day-of-week,
ranges with steps, `L`, DST jumps) that a well-kept library has already met; it is imported
only when a window is judged, so an agent without windows never loads it.

Everything here is pure: an expression, a zone and a clock reading in, a verdict out.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.contract.strict import Meta, StrictStruct

#: Shortest and longest window: a minute (cron's resolution) to a week.
MIN_DURATION_S, MAX_DURATION_S = 60, 7 * 86400


def zone(name: str | None) -> ZoneInfo:
    """The IANA time zone `name` (UTC for None). Raises `ValueError` for an unknown one."""
    if name is None:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


#: The label naming a device's time zone. Label values cannot hold `/`, so `.` stands for it:
#: `tz=Europe.Berlin`, `tz=America.Argentina.Buenos_Aires` (IANA names have no dots).
TZ_LABEL = "tz"


def zone_of_labels(labels: Mapping[str, str]) -> str | None:
    """The IANA zone name a device's `tz` label names (not checked; None without the label)."""
    value = labels.get(TZ_LABEL)
    return value.replace(".", "/") if value else None


@functools.lru_cache(maxsize=512)  # a rollout signs the same few expressions into every document
def check_cron(expr: str) -> None:
    """Raise `ValueError` unless `expr` is a five-field cron expression croniter accepts."""
    from croniter import croniter  # lazy: only devices and rollouts with windows need it

    if len(expr.split()) != 5 or not croniter.is_valid(expr):
        raise ValueError(f"malformed cron expression {expr!r} (five fields: minute hour day month weekday)")


class Window(StrictStruct, frozen=True, kw_only=True):
    """Opens at each time `cron` names (in the device's zone) and stays open `duration_s`."""

    cron: Annotated[str, Meta(min_length=9, max_length=128)]
    duration_s: Annotated[int, Meta(ge=MIN_DURATION_S, le=MAX_DURATION_S)]

    def _check(self) -> None:
        check_cron(self.cron)


class UpdateWindows(StrictStruct, frozen=True, kw_only=True):
    """The windows of one device's update (None: any time); `tz` None = the device's own zone."""

    download: Window | None = None
    activation: Window | None = None
    tz: Annotated[str, Meta(max_length=64)] | None = None

    def _check(self) -> None:
        if self.tz is not None:
            zone(self.tz)


def _last_opening(window: Window, tz: ZoneInfo, now: float) -> datetime:
    from croniter import croniter  # lazy: see check_cron

    local = datetime.fromtimestamp(now, tz) + timedelta(seconds=1)  # an opening at `now` counts
    prev: datetime = croniter(window.cron, local).get_prev(datetime)
    return prev


def is_open(window: Window | None, tz: ZoneInfo, now: float) -> bool:
    """True while `window` is open at `now` (epoch seconds); no window is always open."""
    if window is None:
        return True
    opened = _last_opening(window, tz, now).astimezone(UTC).timestamp()
    return opened <= now < opened + window.duration_s


def next_opening(window: Window | None, tz: ZoneInfo, now: float) -> float:
    """When `window` is next open (epoch seconds): `now` while it is open."""
    if is_open(window, tz, now):
        return now
    assert window is not None
    from croniter import croniter  # lazy: see check_cron

    nxt: datetime = croniter(window.cron, datetime.fromtimestamp(now, tz)).get_next(datetime)
    return nxt.astimezone(UTC).timestamp()


def opens_within(window: Window | None, tz: ZoneInfo, now: float, horizon_s: float) -> bool:
    """Whether `window` is open at some moment of [now, now + horizon_s]."""
    return next_opening(window, tz, now) <= now + horizon_s
