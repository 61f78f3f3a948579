"""The drift monitor: a fleet service component that evaluates drift, fires alerts and triggers.

Every `evaluate_interval_s` it looks for (model, version, cohort) whose telemetry windows were
written within `lookback_s`, takes the windows that are *closed* (ended at least `settle_s`
ago, so late and replayed reports have landed; `AlertManager` evaluates a window only once,
so a half-filled window must not be handed over) and passes them to `AlertManager.evaluate`,
which keeps one episode per drifting subject, sends one `drift` alert per episode and one
`retrain` trigger once the dataset/prediction episode persists (webhook and/or command).
Deliveries that failed are retried every cycle (`AlertManager.redeliver`). The latest closed
window's verdict per key is kept for the Prometheus drift gauges (`snapshot()`).

Reference profiles come from the published bundles (`BundleProfiles`: version row -> TUF
target -> bundle manifest), cached because versions are immutable.

Each cycle also runs the health watch (fleet/telemetry/health.py: error-rate and latency
regressions, devices offline, rollouts stopped by a gate) into the same alert manager.

The monitor also times telemetry ingest (`ingest(device_id, payload)`, `IngestTimer`), so the
publisher's telemetry callback can go through it; `/metrics` exports the timer's histogram.
The background cycle is a job of a `fleet.periodic.PeriodicRunner`.

Errors: `build_drift_monitor` raises `FleetMisuseError` when the alert database cannot be
opened. A key whose evaluation fails (`EdgefleetError`: a bad stored window, a profile
mismatch) is logged, counted (`evaluation_errors`) and skipped; a cycle that fails as a whole
is logged and counted by the runner, never raised from the background thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prometheus_client import Histogram

from agent.contract.manifest import ReferenceProfile
from agent.errors import EdgefleetError
from agent.logs import log_event
from fleet.db.session import DatabaseError
from fleet.errors import FleetError
from fleet.periodic import PeriodicRunner
from fleet.registry.sealed_manifest import read_published_manifest
from fleet.settings import FleetSettings, TelemetrySettings
from fleet.store import Store
from fleet.telemetry.alert_rules import RegressionRule
from fleet.telemetry.alerts import Alert, AlertConfig, AlertManager
from fleet.telemetry.drift import DriftReport, report_drift
from fleet.telemetry.health import HealthConfig, HealthWatch
from fleet.telemetry.ingest import TelemetryStore
from fleet.telemetry.performance import PerformanceSummary, summarize
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository

log = logging.getLogger("edgefleet.fleet.drift_monitor")

ProfileLookup = Callable[[str, str], ReferenceProfile | None]
INGEST_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, math.inf)


class IngestTimer:
    """Times telemetry ingest calls into `edgefleet_telemetry_ingest_seconds` (thread-safe).

    The histogram is unregistered: `fleet.metrics.FleetCollector` exports it at scrape time.
    """

    def __init__(self) -> None:
        self.histogram = Histogram("edgefleet_telemetry_ingest_seconds",
                                   "Time to decode, check, deduplicate and merge one telemetry report",
                                   registry=None, buckets=INGEST_BUCKETS)

    def time(self, fn: Callable[[], str]) -> str:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.histogram.observe(time.perf_counter() - start)


class BundleProfiles:
    """`(model, version) -> ReferenceProfile | None` from the version's published bundle.

    None when the version is unknown, has no bundle target, or its bundle cannot be read
    (logged). Found profiles are cached; misses are retried (the bundle may arrive later).
    `repository` is the service's one TUF repository (read-only use here).
    """

    def __init__(self, store: Store, repository: Repository) -> None:
        self.store = store
        self.repository = repository
        self._cache: dict[tuple[str, str], ReferenceProfile] = {}
        self._lock = threading.Lock()

    def bundle_path(self, model: str, version: str) -> Path | None:
        """The content-addressed file of the version's TUF target, or None."""
        try:
            target = self.store.models.get_version(model, version).bundle_target
            if not target:
                return None
            ref = self.repository.target_ref(str(target))
        except FleetError:
            return None
        dirname, _, basename = ref.path.rpartition("/")
        path = self.repository.targets_dir / dirname / f"{ref.sha256}.{basename}"
        return path if path.is_file() else None

    def __call__(self, model: str, version: str) -> ReferenceProfile | None:
        with self._lock:
            hit = self._cache.get((model, version))
        if hit is not None:
            return hit
        path = self.bundle_path(model, version)
        if path is None:
            return None
        try:
            profile = read_published_manifest(self.repository.repo_dir, path).reference_profile
        except EdgefleetError as exc:
            log_event(log, "drift.profile_unreadable", logging.WARNING, model=model, version=version,
                      error=str(exc))
            return None
        if profile is None or not (profile.features or profile.outputs):
            return None
        with self._lock:
            self._cache[(model, version)] = profile
        return profile


@dataclass(frozen=True)
class DriftGauge:
    """The verdict of the latest closed window of one (model, version, cohort)."""

    model: str
    version: str
    cohort: str
    window_start: float
    report: DriftReport
    performance: PerformanceSummary | None = None  # labels / estimated accuracy of that window

    @property
    def series(self) -> int:
        return len(self.report.features) + len(self.report.outputs)


class DriftMonitor:
    """Periodic drift evaluation over a `TelemetryStore` into an `AlertManager` (module docstring).

    `clock` decides which windows are closed; the wait between cycles is real time
    (`config.evaluate_interval_s`). `run_once()` does one cycle synchronously; `start()` runs
    it in the background (job `drift-monitor` of its `PeriodicRunner`).
    """

    name = "drift-monitor"

    def __init__(
        self,
        telemetry: TelemetryStore,
        alerts: AlertManager,
        profiles: ProfileLookup,
        config: TelemetrySettings | None = None,
        clock: Callable[[], float] = time.time,
        owns_alerts: bool = True,
        health: HealthWatch | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.health = health
        self.alerts = alerts
        self.profiles = profiles
        self.config = config or TelemetrySettings()
        self.clock = clock
        self.ingest_timer = IngestTimer()
        self._owns_alerts = owns_alerts
        self._gauges: dict[tuple[str, str, str], DriftGauge] = {}
        self._done: dict[tuple[str, str, str], float] = {}  # latest window handed over, per key
        self._lock = threading.Lock()
        self._cycle_lock = threading.Lock()
        self._runner = PeriodicRunner(log)
        self._runner.add(self.name, self.run_once, self.config.evaluate_interval_s,
                         on_error=self._cycle_failed, join_timeout_s=30)
        self.evaluations = 0
        self.evaluation_errors = 0
        self.cycles = 0
        self.unprofiled: set[tuple[str, str]] = set()
        # Several fleet processes: only the leader evaluates and alerts (`fleet.cluster.leader`).
        self.active: Callable[[], bool] = lambda: True

    # -- ingest ----------------------------------------------------------------------------
    def ingest(self, device_id: str, payload: bytes) -> None:
        """Publisher telemetry callback: ingest one report, timed for `/metrics`."""
        self.ingest_timer.time(lambda: self.telemetry.ingest(payload))

    # -- evaluation --------------------------------------------------------------------------
    def run_once(self) -> list[Alert]:
        """One cycle: evaluate every key with fresh closed windows, redeliver, refresh gauges.
        Returns the alerts fired in this cycle (none on a standby: `active()` is False)."""
        if not self.active():
            return []
        with self._cycle_lock:
            now = self.clock()
            cfg = self.config
            since = now - cfg.lookback_s
            fired: list[Alert] = []
            gauges: dict[tuple[str, str, str], DriftGauge] = {}
            series = 0
            for model, version, cohort in self.telemetry.window_keys(updated_since=since):
                profile = self.profiles(model, version)
                if profile is None:
                    if (model, version) not in self.unprofiled:
                        self.unprofiled.add((model, version))
                        log_event(log, "drift.no_profile", logging.WARNING, model=model, version=version)
                    continue
                try:
                    found = self._evaluate_key(model, version, cohort, profile, since, now, fired)
                except EdgefleetError as exc:  # bad stored window (fleet) or profile mismatch (agent)
                    self.evaluation_errors += 1
                    log_event(log, "drift.evaluation_failed", logging.WARNING, model=model, version=version,
                              cohort=cohort, error=str(exc))
                    continue
                gauge = found or self._gauges.get((model, version, cohort))  # nothing newly closed
                if gauge is None:
                    continue
                if series + gauge.series <= cfg.max_drift_series:
                    gauges[(model, version, cohort)] = gauge
                    series += gauge.series
            if self.health is not None:
                try:
                    fired += self.health.run_once()
                except (EdgefleetError, DatabaseError) as exc:  # a bad row, a locked store: retried
                    self.evaluation_errors += 1
                    log_event(log, "health.cycle_failed", logging.WARNING, error=str(exc))
            redelivered = self.alerts.redeliver()
            with self._lock:
                self._gauges = gauges
            self.cycles += 1
            log_event(log, "drift.cycle", keys=len(gauges), alerts=len(fired), redelivered=redelivered)
            return fired

    def _evaluate_key(self, model: str, version: str, cohort: str, profile: ReferenceProfile, since: float,
                      now: float, fired: list[Alert]) -> DriftGauge | None:
        """Hand the key's closed windows to the alert manager; the latest one's verdict."""
        window_s = self.telemetry.config.window_s
        done = self._done.get((model, version, cohort))
        # Only windows after the last one handed over are read (and decoded); the alert
        # manager's own cursor still guards against evaluating one twice after a restart.
        start = since - window_s if done is None else max(since - window_s, done + window_s / 2)
        closed: list[dict[str, Any]] = [
            w for w in self.telemetry.windows(model, version, cohort, since=start)
            if float(cast(float, w["window_start"])) + window_s + self.config.settle_s <= now
        ]
        if not closed:
            return None
        fired += self.alerts.evaluate(model, version, cohort, profile, closed, window_s)
        self.evaluations += len(closed)
        latest = closed[-1]
        self._done[(model, version, cohort)] = float(cast(float, latest["window_start"]))
        previous = self._gauges.get((model, version, cohort))
        if previous is not None and previous.window_start == latest["window_start"]:
            return previous  # same window: the verdict cannot have changed
        cfg = self.alerts.config
        verdict = report_drift(profile, latest["report"], cfg.thresholds, cfg.method)
        perf = summarize(latest["report"].performance, profile)
        return DriftGauge(model, version, cohort, float(latest["window_start"]), verdict, perf)

    def drift_score(self, model: str, version: str, since: float) -> float | None:
        """Share of drifted input features over the windows since `since` (rollout gates'
        `max_drift_score`); None without data or profile."""
        profile = self.profiles(model, version)
        merged = self.telemetry.query_windows(model, version, since=since) if profile is not None else None
        if profile is None or merged is None:
            return None
        try:
            return report_drift(profile, merged, self.alerts.config.thresholds,
                                self.alerts.config.method).drifted_share
        except FleetError:
            return None

    def snapshot(self) -> list[DriftGauge]:
        """The latest verdict per key (for the Prometheus drift gauges)."""
        with self._lock:
            return list(self._gauges.values())

    # -- component ---------------------------------------------------------------------------
    def start(self) -> None:
        self._runner.start()

    def _cycle_failed(self, exc: Exception) -> None:
        self.evaluation_errors += 1  # keep evaluating: the runner logged it, the next cycle retries

    def stop(self) -> None:
        self._runner.stop()
        if self._owns_alerts:
            self.alerts.close()


def alert_config(settings: TelemetrySettings) -> AlertConfig:
    """The `AlertConfig` the settings describe."""
    return AlertConfig(persist_windows=settings.persist_windows, webhook_url=settings.webhook_url,
                       command=tuple(settings.command), webhook_timeout_s=settings.webhook_timeout_s,
                       command_timeout_s=settings.command_timeout_s, clear_windows=settings.clear_windows)


def health_config(settings: TelemetrySettings) -> HealthConfig:
    """The `HealthConfig` the settings describe."""
    rule = RegressionRule(min_requests=settings.min_requests, max_error_increase=settings.max_error_increase,
                          max_latency_ratio=settings.max_latency_ratio)
    return HealthConfig(window_s=settings.health_window_s, settle_s=settings.settle_s, rule=rule,
                        offline_after_s=settings.offline_after_s, gate_alerts=settings.gate_alerts)


def build_drift_monitor(settings: FleetSettings, store: Store, telemetry: TelemetryStore,
                        clock: Callable[[], float] | None = None,
                        repository: Repository | None = None) -> DriftMonitor:
    """The monitor `fleet serve` runs: its alert manager over `<data_dir>/alerts.db` or PostgreSQL
    (closed when the monitor stops) and profiles from the bundles of `repository` (the service passes its
    own; opened from the settings when not given). Raises `FleetMisuseError` (alert database)."""
    now = clock or time.time
    alerts = AlertManager(settings.alerts_database, alert_config(settings.telemetry), clock=now)
    repo = repository or Repository(settings.repo_dir, KeyStore(settings.keys_dir))
    health = HealthWatch(telemetry, alerts, store, health_config(settings.telemetry), clock=now)
    return DriftMonitor(telemetry, alerts, BundleProfiles(store, repo), settings.telemetry, clock=now,
                        health=health)
