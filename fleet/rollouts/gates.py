"""Rollout gates: thresholds a stage must stay within, evaluated as pure functions.

Two kinds of evidence feed a gate:
- device outcomes counted by the controller (install failures incl. timeouts, local
  rollbacks), as a percentage of the devices of the rollout that reached an outcome;
- fleet metrics of the candidate version against the version it replaces (error rate,
  latency p95) and of the candidate alone (drift score, shadow agreement). They come from a
  `MetricsSource`: `TelemetryMetrics` reads the telemetry ingest's merged windows; the
  telemetry side can supply drift through its `drift` callable. A metric gate only speaks
  once both versions have `min_requests` requests, so a quiet canary never trips it by noise.

Defaults follow the anchors (hawkBit's error threshold, AWS IoT's abort criteria) but are
tighter, because a model that fails health on the device is the common case here.

Errors: `GateThresholds.parse` raises `FleetInputError` naming the bad field.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.contract.director import TargetRef
from agent.contract.telemetry import latency_bucket_upper
from fleet.errors import FleetInputError


class GateThresholds(BaseModel):
    """A rollout's `thresholds` document (every key optional; defaults below)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_install_failure_pct: Annotated[float, Field(ge=0, le=100)] = 20.0
    max_rollback_pct: Annotated[float, Field(ge=0, le=100)] = 20.0
    min_finished_devices: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    max_error_rate_increase: Annotated[float, Field(ge=0, le=1)] = 0.02
    max_latency_p95_ratio: Annotated[float, Field(ge=1, le=100)] = 1.5
    max_drift_score: Annotated[float, Field(ge=0, le=1)] = 0.5
    min_shadow_agreement: Annotated[float, Field(ge=0, le=1)] = 0.9
    min_requests: Annotated[int, Field(ge=1, le=10**9)] = 200

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> GateThresholds:
        """Validate a stored/posted thresholds dict. Raises FleetInputError naming each bad field."""
        try:
            return cls.model_validate(raw or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'thresholds'}: {e['msg']}"
                                 for e in exc.errors())
            raise FleetInputError(f"invalid rollout thresholds: {problems}") from None


@dataclass(frozen=True)
class OutcomeCounts:
    """Device outcomes of one rollout so far (forward phase)."""

    assigned: int = 0
    succeeded: int = 0
    install_failed: int = 0
    timeout: int = 0
    local_rollback: int = 0
    window_missed: int = 0  # no window opened in time: neither a success nor a failure

    @property
    def finished(self) -> int:
        """Devices with a verdict on the bundle (a missed window says nothing about it)."""
        return self.succeeded + self.install_failed + self.timeout + self.local_rollback


@dataclass(frozen=True)
class VersionMetrics:
    """What the fleet knows of one version's behaviour since a moment (None = unknown)."""

    requests: int = 0
    errors: int = 0
    latency_p95_ms: float | None = None
    drift_score: float | None = None
    shadow_agreement: float | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class Breach:
    """One gate crossed: which, by how much, and a sentence for the audit log."""

    gate: str
    value: float
    limit: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "value": self.value, "limit": self.limit, "message": self.message}


class MetricsSource(Protocol):
    """Where metric gates get their evidence (the telemetry side implements this)."""

    def version_metrics(
        self, model: str, version: str, since: float, devices: Collection[str] | None = None
    ) -> VersionMetrics | None: ...


def rollout_evidence(
    metrics: MetricsSource | None,
    index: Mapping[str, TargetRef],
    target_bundle: str,
    since: float,
    from_bundles: Iterable[str | None],
    shadow_agreement: float | None = None,
) -> tuple[VersionMetrics | None, VersionMetrics | None]:
    """The candidate's metrics and the baseline's, for `evaluate`.

    The baseline is the version most of the assigned devices ran before (`from_bundles`);
    `index` maps bundle ids to targets (names and versions); both since `since`. A shadow
    agreement (from the devices' `shadow_report` events) joins the candidate's metrics.
    """
    candidate = baseline = None
    target = index.get(target_bundle)
    if metrics is not None and target is not None:
        candidate = metrics.version_metrics(target.name, target.version, since)
        previous = Counter(b for b in from_bundles if b and b != target_bundle).most_common(1)
        if previous and previous[0][0] in index:
            prev = index[previous[0][0]]
            baseline = metrics.version_metrics(prev.name, prev.version, since)
    if shadow_agreement is not None:
        candidate = replace(candidate or VersionMetrics(), shadow_agreement=shadow_agreement)
    return candidate, baseline


def evaluate(
    t: GateThresholds,
    counts: OutcomeCounts,
    candidate: VersionMetrics | None = None,
    baseline: VersionMetrics | None = None,
) -> list[Breach]:
    """Every gate the evidence crosses (empty list = all clear)."""
    out: list[Breach] = []
    if counts.finished >= t.min_finished_devices:
        fail_pct = 100.0 * (counts.install_failed + counts.timeout) / counts.finished
        if fail_pct > t.max_install_failure_pct:
            out.append(Breach("install_failure_pct", fail_pct, t.max_install_failure_pct,
                              f"{counts.install_failed + counts.timeout} of {counts.finished} devices failed "
                              f"to install ({fail_pct:.1f} % > {t.max_install_failure_pct} %)"))
        rb_pct = 100.0 * counts.local_rollback / counts.finished
        if rb_pct > t.max_rollback_pct:
            out.append(Breach("rollback_pct", rb_pct, t.max_rollback_pct,
                              f"{counts.local_rollback} of {counts.finished} devices rolled back by "
                              f"themselves ({rb_pct:.1f} % > {t.max_rollback_pct} %)"))
    if candidate is None:
        return out
    if candidate.drift_score is not None and candidate.drift_score > t.max_drift_score:
        out.append(Breach("drift_score", candidate.drift_score, t.max_drift_score,
                          f"drift score {candidate.drift_score:.3f} > {t.max_drift_score}"))
    if candidate.shadow_agreement is not None and candidate.shadow_agreement < t.min_shadow_agreement:
        out.append(Breach("shadow_agreement", candidate.shadow_agreement, t.min_shadow_agreement,
                          f"shadow agreement {candidate.shadow_agreement:.3f} < {t.min_shadow_agreement}"))
    if baseline is None or candidate.requests < t.min_requests or baseline.requests < t.min_requests:
        return out
    new_err, old_err = candidate.error_rate or 0.0, baseline.error_rate or 0.0
    if new_err - old_err > t.max_error_rate_increase:
        out.append(Breach("error_rate_increase", new_err - old_err, t.max_error_rate_increase,
                          f"error rate {new_err:.4f} vs {old_err:.4f} before "
                          f"(+{new_err - old_err:.4f} > {t.max_error_rate_increase})"))
    if candidate.latency_p95_ms is not None and baseline.latency_p95_ms:
        ratio = candidate.latency_p95_ms / baseline.latency_p95_ms
        if ratio > t.max_latency_p95_ratio:
            out.append(Breach("latency_p95_ratio", ratio, t.max_latency_p95_ratio,
                              f"latency p95 {candidate.latency_p95_ms:.3f} ms vs "
                              f"{baseline.latency_p95_ms:.3f} ms "
                              f"(x{ratio:.2f} > x{t.max_latency_p95_ratio})"))
    return out


def latency_quantile_ms(counts: np.ndarray, q: float) -> float | None:
    """Quantile of a log-bucket latency histogram (upper bucket bound, ms); None when empty."""
    total = int(counts.sum())
    if total == 0:
        return None
    i = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    return latency_bucket_upper(min(i, counts.size - 1)) * 1e3


class TelemetryMetrics:
    """`MetricsSource` over the telemetry ingest (`fleet.telemetry.ingest.TelemetryStore`).

    `telemetry` needs `query_windows(model, version, cohort=None, since=None)` returning a
    merged report (`requests`, `errors`, `latency_counts`) or None. `drift(model, version,
    since)` is the telemetry side's drift score in [0, 1] (share of drifted columns), if any.
    Windows are not per device, so `devices` is ignored (the version is the cohort).
    """

    def __init__(self, telemetry: Any,
                 drift: Callable[[str, str, float], float | None] | None = None) -> None:
        self.telemetry = telemetry
        self.drift = drift

    def version_metrics(
        self, model: str, version: str, since: float, devices: Collection[str] | None = None
    ) -> VersionMetrics | None:
        report = self.telemetry.query_windows(model, version, since=since)
        drift = self.drift(model, version, since) if self.drift is not None else None
        if report is None:
            return VersionMetrics(drift_score=drift) if drift is not None else None
        p95 = latency_quantile_ms(np.asarray(report.latency_counts), 0.95)
        return VersionMetrics(requests=int(report.requests), errors=int(report.errors),
                              latency_p95_ms=None if p95 is None or math.isnan(p95) else p95,
                              drift_score=drift)
