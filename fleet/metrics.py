"""Prometheus metrics of the fleet service, read at scrape time (prometheus_client).

Most figures already live somewhere authoritative: devices and rollouts in the store, ingest
counters in the `TelemetryStore`, alerts in the `AlertManager`'s database, publisher counters
on the `Publisher`, the latest drift verdicts on the `DriftMonitor`. So `FleetCollector`, a
custom `Collector`, reads them when Prometheus scrapes instead of mirroring every change into
counters (which would drift from the store after a restart). Only two things are measured as
they happen: API requests (`ApiMetrics`, fed by an ASGI middleware) and ingest latency
(`fleet.telemetry.monitor.IngestTimer`, owned by the drift monitor that times ingest); their
metric objects are unregistered and handed to the collector. The family builders of a source
live beside it when they are its own: drift (fleet/telemetry/drift_metrics.py), serving
(fleet/telemetry/serving_metrics.py), signed reports (report_verify.py), acked streams
(fleet/delivery/acked_stream.py). The sources are the collaborators
`fleet serve` built once (`sources_of`), never found by scanning the running components.

A source that fails to answer (a locked database, a component mid-stop) does not fail the
scrape: its families are left out and `edgefleet_scrape_errors_total{source}` counts it.
Label cardinality is bounded: rollout series cover unfinished rollouts plus the
`RECENT_ROLLOUTS` most recent finished ones; drift series are capped by the monitor; model
serving series are per (model, version, cohort), never per device, for the keys with
telemetry within `SERVING_LOOKBACK_S`, at most `MetricSources.max_serving_series` of them
(fleet/telemetry/serving.py keeps the figures; counters there are exact across restarts).

Metric names (every one is exported even when it has no samples yet):

| family | type | labels |
|---|---|---|
| `edgefleet_devices` | gauge | `state` (reported lifecycle state), `online` |
| `edgefleet_devices_revoked` | gauge | |
| `edgefleet_device_agent_versions` | gauge | `agent_version` |
| `edgefleet_rollouts` | gauge | `state` |
| `edgefleet_rollout_devices` | gauge | `rollout`, `model_version`, `status` |
| `edgefleet_rollout_stage` | gauge | `rollout`, `model_version`, `state` |
| `edgefleet_rollout_outcomes` | gauge | `rollout`, `model_version`, `outcome` |
| `edgefleet_telemetry_reports_total` | counter | `result` (accepted, duplicate, rejected) |
| `edgefleet_telemetry_rejected_total` | counter | `reason` |
| `edgefleet_telemetry_ingest_seconds` | histogram | |
| `edgefleet_drift_statistic` / `_threshold` | gauge | `model`, `version`, `cohort`, `feature`, `statistic` |
| `edgefleet_drift_detected` | gauge | `model`, `version`, `cohort`, `feature` |
| `edgefleet_drift_share`, `edgefleet_dataset_drift` | gauge | `model`, `version`, `cohort` |
| `edgefleet_prediction_drift`, `edgefleet_drift_window_start_seconds` | gauge | model, version, cohort |
| `edgefleet_drift_evaluations_total`, `edgefleet_drift_evaluation_errors_total` | counter | |
| `edgefleet_model_accuracy` | gauge | `model`, `version`, `cohort`, `kind` (realised, estimated, ...) |
| `edgefleet_model_mae` | gauge | `model`, `version`, `cohort` |
| `edgefleet_model_labels` | gauge | `model`, `version`, `cohort`, `outcome` (matched, unknown, ...) |
| `edgefleet_alerts_total` | counter | `kind` (see fleet/telemetry/alerts.py), `model`, `version`, `cohort` |
| `edgefleet_alerts_undelivered`, `edgefleet_alerts_unacknowledged` | gauge | `kind` |
| `edgefleet_model_requests_total`, `_errors_total`, `_rejected_total` | counter | model, version, cohort |
| `edgefleet_model_latency_seconds` | histogram | model, version, cohort (le: 2^k µs, 32 µs .. 33.5 s) |
| `edgefleet_model_cpu_seconds_total` | counter | model, version, cohort (user + system) |
| `edgefleet_model_rss_max_bytes`, `edgefleet_model_devices_reporting` | gauge | model, version, cohort |
| `edgefleet_model_devices` | gauge | `bundle` (the active bundle devices report), `online` |
| `edgefleet_publisher_chunks_total`, `edgefleet_publisher_bytes_total` | counter | |
| `edgefleet_publisher_refusals_total` | counter | `status` (400, 404, 416, 429, 503) |
| `edgefleet_mqtt_malformed_total` | counter | `kind` (report, event, request): dropped device messages |
| `edgefleet_reports_refused_total` | counter | `kind`, `reason` (unsigned, bad_signature, replayed, ...) |
| `edgefleet_ingest_stream_flushes_total`, `_flush_failures_total` | counter | `stream` (telemetry, events) |
| `edgefleet_ingest_stream_acks_total`, `_stale_acks_total` | counter | `stream` |
| `edgefleet_ingest_stream_held` | gauge | `stream`: received, not yet acknowledged |
| `edgefleet_api_requests_total` | counter | `method`, `route` (template), `status` |
| `edgefleet_api_request_duration_seconds` | histogram | `method`, `route` |
| `edgefleet_scrape_errors_total` | counter | `source` |
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.logs import log_event
from fleet.db.sql import json_field
from fleet.delivery.acked_stream import AckedStream, stream_families
from fleet.delivery.report_verify import report_families
from fleet.rollouts.store import FINISHED_STATES, STATES
from fleet.telemetry.alert_records import KINDS
from fleet.telemetry.drift_metrics import DriftSource, drift_families
from fleet.telemetry.monitor import DriftMonitor, IngestTimer
from fleet.telemetry.serving_metrics import serving_families

if TYPE_CHECKING:
    from fleet.store import Store
    from fleet.telemetry.alerts import AlertManager
    from fleet.telemetry.ingest import TelemetryStore

log = logging.getLogger("edgefleet.fleet.metrics")

RECENT_ROLLOUTS = 20
SERVING_LOOKBACK_S = 24 * 3600.0
REFUSAL_STATUSES = (400, 404, 416, 429, 503)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, math.inf)
UNMATCHED_ROUTE = "<unmatched>"


class ApiMetrics:
    """Request counts and latencies of the admin API, labelled by route template."""

    def __init__(self) -> None:
        self.requests = Counter("edgefleet_api_requests", "API requests by method, route template and status",
                                ["method", "route", "status"], registry=None)
        self.duration = Histogram("edgefleet_api_request_duration_seconds",
                                  "API request handling time by method and route template",
                                  ["method", "route"], registry=None, buckets=API_BUCKETS)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


class ApiMetricsMiddleware:
    """Pure ASGI middleware: FastAPI puts the matched route in the scope while routing, so
    the label is its path template (`/v1/rollouts/{rollout_id}`), never the raw path."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED_ROUTE
            elapsed = time.perf_counter() - start
            self.metrics.observe(scope.get("method", "GET"), str(template), status, elapsed)


@dataclass
class MetricSources:
    """Everything the collector reads; any member may be absent (then its families are empty)."""

    store: Store
    telemetry: TelemetryStore | None = None
    alerts: AlertManager | None = None
    drift: DriftSource | None = None
    publisher: Any | None = None  # fleet.delivery.publisher.Publisher: bytes_sent, chunks_sent, refused
    ingest_timer: IngestTimer | None = None
    api: ApiMetrics | None = None
    streams: tuple[AckedStream, ...] = ()  # the acked ingest streams (fleet/delivery/acked_stream.py)
    max_serving_series: int = 500
    clock: Callable[[], float] = time.time


def sources_of(store: Store, api: ApiMetrics | None = None, publisher: Any | None = None,
               monitor: DriftMonitor | None = None, telemetry: TelemetryStore | None = None,
               alerts: AlertManager | None = None, max_serving_series: int = 500,
               streams: tuple[AckedStream, ...] = ()) -> MetricSources:
    """The collector's sources from the service's collaborators: the drift monitor brings its
    telemetry store, alert manager and ingest timer; `telemetry`/`alerts` (the stores the API
    opened itself when it runs alone) fill in only without a monitor."""
    if monitor is not None:
        return MetricSources(store=store, telemetry=monitor.telemetry, alerts=monitor.alerts, drift=monitor,
                             publisher=publisher, ingest_timer=monitor.ingest_timer, api=api,
                             streams=streams, max_serving_series=max_serving_series)
    return MetricSources(store=store, telemetry=telemetry, alerts=alerts, publisher=publisher, api=api,
                         streams=streams, max_serving_series=max_serving_series)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or [])


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels or [])


@dataclass
class _Errors:
    counts: TallyCounter[str] = field(default_factory=TallyCounter)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FleetCollector(Collector):
    """Reads current values from `sources()` at every scrape (see the module docstring)."""

    def __init__(self, sources: Callable[[], MetricSources]) -> None:
        self._sources = sources
        self._errors = _Errors()

    def collect(self) -> Iterator[Metric]:
        src = self._sources()
        sections: list[tuple[str, Callable[[MetricSources], list[Metric]]]] = [
            ("devices", _device_families), ("rollouts", _rollout_families),
            ("telemetry", _telemetry_families), ("serving", _serving_families), ("drift", _drift_families),
            ("alerts", _alert_families), ("publisher", _publisher_families),
            ("streams", lambda src: list(stream_families(src.streams))),
        ]
        for name, build in sections:
            try:
                families = build(src)
            except Exception as exc:  # one bad source must not fail the whole scrape
                with self._errors.lock:
                    self._errors.counts[name] += 1
                log_event(log, "metrics.source_failed", logging.WARNING, source=name,
                          error=f"{type(exc).__name__}: {exc}")
                continue
            yield from families
        if src.ingest_timer is not None:
            yield from src.ingest_timer.histogram.collect()
        else:
            yield from IngestTimer().histogram.collect()  # exported empty, so the name always exists
        if src.api is not None:
            yield from src.api.requests.collect()
            yield from src.api.duration.collect()
        errors = _counter("edgefleet_scrape_errors", "Metric sources that failed to answer a scrape",
                          ["source"])
        with self._errors.lock:
            for name, n in sorted(self._errors.counts.items()):
                errors.add_metric([name], n)
        yield errors


def _device_families(src: MetricSources) -> list[Metric]:
    devices = _gauge("edgefleet_devices", "Enrolled, unrevoked devices by reported lifecycle state and "
                     "online flag", ["state", "online"])
    revoked = _gauge("edgefleet_devices_revoked", "Revoked devices")
    versions = _gauge("edgefleet_device_agent_versions", "Unrevoked devices by agent version",
                      ["agent_version"])
    with src.store.read() as db:
        state = json_field(db.dialect, "reported_state", "state")
        rows = db.execute(
            f"SELECT coalesce({state}, 'unknown'), online, count(*) "  # noqa: S608
            "FROM devices WHERE revoked = 0 GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        n_revoked = db.scalar("SELECT count(*) FROM devices WHERE revoked = 1")
        agent_rows = db.execute(
            "SELECT coalesce(agent_version, 'unknown'), count(*) FROM devices WHERE revoked = 0 "
            "GROUP BY 1 ORDER BY 1").fetchall()
    for state, online, n in rows:
        devices.add_metric([str(state), "true" if online else "false"], n)
    revoked.add_metric([], n_revoked)
    for version, n in agent_rows:
        versions.add_metric([str(version)], n)
    return [devices, revoked, versions]


def _rollout_families(src: MetricSources) -> list[Metric]:
    by_state = _gauge("edgefleet_rollouts", "Rollouts by state", ["state"])
    devices = _gauge("edgefleet_rollout_devices", "Devices of a rollout by progress status",
                     ["rollout", "model_version", "status"])
    stage = _gauge("edgefleet_rollout_stage", "Current stage index of a rollout",
                   ["rollout", "model_version", "state"])
    outcomes = _gauge("edgefleet_rollout_outcomes", "Devices of a rollout by final outcome "
                      "(succeeded, install_failed, local_rollback, timeout, reverted, ...)",
                      ["rollout", "model_version", "outcome"])
    finished = {"finished": list(FINISHED_STATES), "recent": RECENT_ROLLOUTS}
    with src.store.read() as db:
        counts: dict[str, int] = {r[0]: int(r[1]) for r in db.execute(
            "SELECT state, count(*) FROM rollouts GROUP BY state")}
        shown = db.execute(
            "SELECT id, model_version_id, state, stage FROM rollouts WHERE state NOT IN :finished "
            "UNION SELECT * FROM (SELECT id, model_version_id, state, stage FROM rollouts "
            "WHERE state IN :finished ORDER BY updated_at DESC LIMIT :recent) AS recent",
            finished).fetchall()
        ids = [r[0] for r in shown]
        status_rows = db.execute(
            "SELECT rollout_id, status, count(*) FROM rollout_devices WHERE rollout_id IN :ids "
            "GROUP BY 1, 2 ORDER BY 1, 2", {"ids": ids}).fetchall() if ids else []
        outcome_rows = db.execute(
            "SELECT rollout_id, outcome, count(*) FROM rollout_progress WHERE outcome IS NOT NULL "
            "AND rollout_id IN :ids GROUP BY 1, 2 ORDER BY 1, 2", {"ids": ids}).fetchall() if ids else []
    for state in STATES:
        by_state.add_metric([state], counts.get(state, 0))
    versions = {r[0]: r[1] for r in shown}
    for rid, version, state, index in sorted(shown):
        stage.add_metric([rid, version, state], index)
    for rid, status, n in status_rows:
        devices.add_metric([rid, versions[rid], status], n)
    for rid, outcome, n in outcome_rows:
        outcomes.add_metric([rid, versions[rid], outcome], n)
    return [by_state, devices, stage, outcomes]


def _telemetry_families(src: MetricSources) -> list[Metric]:
    reports = _counter("edgefleet_telemetry_reports", "Telemetry reports by ingest result", ["result"])
    rejected = _counter("edgefleet_telemetry_rejected", "Rejected telemetry reports by reason", ["reason"])
    if src.telemetry is not None:
        c = src.telemetry.counters
        for result, n in (("accepted", c.accepted), ("duplicate", c.duplicates), ("rejected", c.rejected)):
            reports.add_metric([result], n)
        for reason, n in sorted(dict(c.reasons).items()):
            rejected.add_metric([reason], n)
    return [reports, rejected]


def _serving_families(src: MetricSources) -> list[Metric]:
    totals = src.telemetry.serving_totals(src.clock() - SERVING_LOOKBACK_S, src.max_serving_series) \
        if src.telemetry is not None else []
    return serving_families(totals, src.store)


def _drift_families(src: MetricSources) -> list[Metric]:
    return drift_families(src.drift)


def _alert_families(src: MetricSources) -> list[Metric]:
    total = _counter("edgefleet_alerts", "Alerts by kind (drift, retrain, error_rate, latency, offline, "
                     "rollout_gate); escalations count as alerts",
                     ["kind", "model", "version", "cohort"])
    undelivered = _gauge("edgefleet_alerts_undelivered",
                         "Alerts whose webhook/command delivery failed so far", ["kind"])
    unacked = _gauge("edgefleet_alerts_unacknowledged", "Alerts no operator acknowledged yet", ["kind"])
    if src.alerts is not None:
        pending: TallyCounter[str] = TallyCounter(dict.fromkeys(KINDS, 0))
        open_: TallyCounter[str] = TallyCounter(dict.fromkeys(KINDS, 0))
        for r in src.alerts.counts():
            total.add_metric([r["kind"], r["model"], r["version"], r["cohort"]], r["total"])
            pending[r["kind"]] += r["undelivered"] or 0
            open_[r["kind"]] += r["unacked"] or 0
        for kind in sorted(pending):
            undelivered.add_metric([kind], pending[kind])
            unacked.add_metric([kind], open_[kind])
    return [total, undelivered, unacked]


def _publisher_families(src: MetricSources) -> list[Metric]:
    chunks = _counter("edgefleet_publisher_chunks", "Repository chunks served to devices over MQTT")
    sent = _counter("edgefleet_publisher_bytes", "Repository bytes served to devices over MQTT")
    refused = _counter("edgefleet_publisher_refusals", "Chunk requests refused, by status", ["status"])
    malformed = _counter("edgefleet_mqtt_malformed", "Malformed device messages dropped, by kind", ["kind"])
    p = src.publisher
    if p is not None:
        chunks.add_metric([], getattr(p, "chunks_sent", 0))
        sent.add_metric([], p.bytes_sent)
        counts = dict(p.refused)
        for status in sorted({*REFUSAL_STATUSES, *counts}):
            refused.add_metric([str(status)], counts.get(status, 0))
        for kind, n in (p.malformed.counts() if hasattr(p, "malformed") else {}).items():
            malformed.add_metric([kind], n)
    return [chunks, sent, refused, malformed, *report_families(getattr(p, "inbound_check", None))]


class FleetMetrics:
    """One app's metrics: the API request metrics and a registry holding the collector."""

    def __init__(self, sources: Callable[[ApiMetrics], MetricSources]) -> None:
        # `<name>_created` series (process-wide switch in prometheus_client) would double every
        # counter and histogram series for a timestamp nobody graphs.
        disable_created_metrics()
        self.api = ApiMetrics()
        self.collector = FleetCollector(lambda: sources(self.api))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        """The Prometheus text exposition of one scrape."""
        return generate_latest(self.registry)
