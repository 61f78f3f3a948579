"""Pure alert decisions: episodes, serving regressions, offline devices (no I/O, no clock).

Every alert kind follows one rule: an *episode* opens when a condition starts to hold, and
one alert is sent when it opens, not one per window or cycle. `step_episode` is that rule as
a function of the stored episode and one observation:

- an observation that fires opens an episode (alert) or continues the open one;
- an episode ends only after `clear_after` consecutive observations that do not fire, so a
  condition that flaps around its threshold stays one episode instead of alerting each time;
- an observation without enough evidence (a tiny sample) is not an observation: the caller
  does not call `step_episode` at all and the episode is unchanged;
- `members` is what the alert named (the drifted features of a dataset episode). When an
  open episode's observation names members it has not named yet, the step *escalates*: a new
  alert in the same episode, naming the new members. Why the same episode and not a new one:
  the incident is still under way (its acknowledgement, retraining trigger and first window
  stay where they are), only its extent grew; a new episode would pretend the first one
  ended. A set that shrinks does not alert (recovery is not something to act on) and a
  member that leaves and comes back within the episode does not alert again (no flapping).

Serving regressions compare a *candidate* version with the cohort's *baseline*: of the
versions that served the cohort in the comparison span, the one whose telemetry began first
(`pick_baselines`), which during a rollout is the version the devices ran before. Both sides
need `min_requests` before anything is judged (`error_regression`, `latency_regression`
answer None then: too little evidence, the episode is unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from agent.contract.telemetry import latency_bucket_upper
from fleet.errors import FleetMisuseError


@dataclass(frozen=True)
class Episode:
    """An open episode as stored: when it began, its streaks, and what its alerts named."""

    opened_at: float
    last_seen: float  # last observation that fired
    consecutive: int = 1  # observations in a row that fired (the retraining trigger counts these)
    clear_streak: int = 0  # observations in a row that did not fire
    members: frozenset[str] = frozenset()
    escalations: int = 0
    alert_id: int | None = None  # the alert that opened it (escalations point to it)


@dataclass(frozen=True)
class EpisodeStep:
    """The episode after one observation, and whether it must alert."""

    episode: Episode | None  # None: no episode (never opened, or ended by this step)
    opened: bool = False  # alert: a new episode
    escalated: frozenset[str] = frozenset()  # alert in the same episode: these members are new
    ended: bool = False


def step_episode(episode: Episode | None, firing: bool, now: float, clear_after: int,
                 members: Iterable[str] = ()) -> EpisodeStep:
    """One observation of a condition (module docstring). `now` is the observation's time
    (a window's start, or the cycle's clock)."""
    if clear_after < 1:
        raise FleetMisuseError("alerts: clear_after must be >= 1")
    names = frozenset(members)
    if episode is None:
        if not firing:
            return EpisodeStep(None)
        return EpisodeStep(Episode(now, now, members=names), opened=True)
    if firing:
        new = names - episode.members
        grown = replace(episode, last_seen=now, consecutive=episode.consecutive + 1, clear_streak=0,
                        members=episode.members | new, escalations=episode.escalations + bool(new))
        return EpisodeStep(grown, escalated=new)
    streak = episode.clear_streak + 1
    if streak >= clear_after:
        return EpisodeStep(None, ended=True)
    return EpisodeStep(replace(episode, consecutive=0, clear_streak=streak))


# -- serving regressions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ServingSample:
    """One version's serving figures in one cohort over the comparison span."""

    version: str
    requests: int  # inference calls (errors included)
    errors: int
    rejected: int  # refused before inference (invalid input, overload): not in `requests`
    latency_counts: np.ndarray = field(repr=False)  # the reports' log-bucket histogram
    first_window: float  # start of its first window in the span
    devices: int = 0

    @property
    def failures(self) -> int:
        return self.errors + self.rejected

    @property
    def attempts(self) -> int:
        """What clients asked for: served plus refused."""
        return self.requests + self.rejected

    @property
    def failure_rate(self) -> float:
        return self.failures / self.attempts if self.attempts else math.nan

    def latency_quantile(self, q: float) -> float:
        """Upper bucket bound (s) of the `q` quantile of latency; NaN without requests."""
        counts = np.asarray(self.latency_counts, dtype=np.int64)
        total = int(counts.sum())
        if total == 0:
            return math.nan
        i = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
        return latency_bucket_upper(min(i, counts.size - 2))  # the open last bucket: its lower bound


@dataclass(frozen=True)
class RegressionRule:
    """When a candidate is worse than its baseline. `min_requests` is the sample floor of both
    sides; the error rule needs both a margin (`max_error_increase`, absolute) and a one-sided
    two-proportion z above `min_z` (2.33: p < 0.01), so a large fleet does not alert on a
    trivial difference and a small one does not alert on noise; the latency rule compares p95
    (`max_latency_ratio`; the histogram's buckets are 19 % wide, so below ~1.2 it means little)."""

    min_requests: int = 200
    max_error_increase: float = 0.02
    min_z: float = 2.33
    max_latency_ratio: float = 1.5
    latency_quantile: float = 0.95

    def __post_init__(self) -> None:
        if self.min_requests < 1 or self.max_error_increase < 0 or self.min_z < 0 \
                or self.max_latency_ratio <= 1 or not 0 < self.latency_quantile < 1:
            raise FleetMisuseError("alerts: min_requests >= 1, max_error_increase >= 0, min_z >= 0, "
                                   "max_latency_ratio > 1 and 0 < latency_quantile < 1 required")


@dataclass(frozen=True)
class Regression:
    """A judged comparison: `firing` when the candidate regressed; the figures are the evidence."""

    firing: bool
    statistic: str  # "failure_rate" | "latency_p95_ratio"
    value: float
    threshold: float
    evidence: dict[str, float]
    detail: str


def pick_baselines(samples: Iterable[ServingSample]) -> dict[str, str]:
    """candidate version -> baseline version for one cohort: the baseline is the version whose
    telemetry began first in the span (ties: the smaller version string), every other version
    is a candidate against it. Fewer than two versions: nothing to compare."""
    ordered = sorted(samples, key=lambda s: (s.first_window, s.version))
    if len(ordered) < 2:
        return {}
    base = ordered[0].version
    return {s.version: base for s in ordered[1:]}


def _enough(candidate: ServingSample, baseline: ServingSample, rule: RegressionRule) -> bool:
    return candidate.attempts >= rule.min_requests and baseline.attempts >= rule.min_requests


def error_regression(candidate: ServingSample, baseline: ServingSample, rule: RegressionRule
                     ) -> Regression | None:
    """Failure rate (errors + rejected over attempts) of the candidate against the baseline;
    None below the sample floor."""
    if not _enough(candidate, baseline, rule):
        return None
    pc, pb = candidate.failure_rate, baseline.failure_rate
    nc, nb = candidate.attempts, baseline.attempts
    pooled = (candidate.failures + baseline.failures) / (nc + nb)
    se = math.sqrt(pooled * (1 - pooled) * (1 / nc + 1 / nb))
    z = (pc - pb) / se if se > 0 else (math.inf if pc > pb else 0.0)
    threshold = pb + rule.max_error_increase
    firing = pc > threshold and z >= rule.min_z
    evidence = {"candidate_failure_rate": pc, "baseline_failure_rate": pb, "z": z,
                "candidate_attempts": float(nc), "baseline_attempts": float(nb),
                "candidate_errors": float(candidate.errors), "candidate_rejected": float(candidate.rejected),
                "baseline_errors": float(baseline.errors), "baseline_rejected": float(baseline.rejected)}
    detail = (f"{candidate.version} fails {pc:.2%} of {nc} requests vs {pb:.2%} of {nb} on "
              f"{baseline.version} (z {z:.1f})")
    return Regression(firing, "failure_rate", pc, threshold, evidence, detail)


def latency_regression(candidate: ServingSample, baseline: ServingSample, rule: RegressionRule
                       ) -> Regression | None:
    """Latency quantile ratio of the candidate over the baseline; None below the sample floor
    (of served requests: refused ones have no latency)."""
    if candidate.requests < rule.min_requests or baseline.requests < rule.min_requests:
        return None
    qc = candidate.latency_quantile(rule.latency_quantile)
    qb = baseline.latency_quantile(rule.latency_quantile)
    if not (math.isfinite(qc) and math.isfinite(qb)) or qb <= 0:
        return None
    ratio = qc / qb
    pct = round(rule.latency_quantile * 100)
    evidence = {f"candidate_p{pct}_s": qc, f"baseline_p{pct}_s": qb,
                "candidate_requests": float(candidate.requests),
                "baseline_requests": float(baseline.requests)}
    detail = (f"{candidate.version} p{pct} {qc * 1e3:.3g} ms vs {qb * 1e3:.3g} ms on {baseline.version} "
              f"(x{ratio:.2f})")
    return Regression(ratio > rule.max_latency_ratio, f"latency_p{pct}_ratio", ratio, rule.max_latency_ratio,
                      evidence, detail)


# -- devices offline -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSeen:
    """One unrevoked device: whether the broker says it is online and when it was last heard."""

    device_id: str
    online: bool
    last_seen: float | None  # Unix s; None when never heard


def offline_devices(devices: Iterable[DeviceSeen], now: float, offline_after_s: float) -> dict[str, float]:
    """device id -> seconds offline, for devices offline longer than `offline_after_s` (a
    device never heard is not offline: it has not started yet)."""
    out: dict[str, float] = {}
    for d in devices:
        if d.online or d.last_seen is None:
            continue
        gone = now - d.last_seen
        if gone > offline_after_s:
            out[d.device_id] = gone
    return out
