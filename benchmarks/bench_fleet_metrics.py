"""Drift monitor cycles and /metrics scrapes over a populated fleet.

Setup (untimed): a fleet store with 1,000 devices (reported states) and 20 rollouts of 50
devices each; a telemetry store with 8 (version, cohort) keys x 30 one-minute windows of a
20-feature + 1-output profile (2 devices per window, drift injected in 3 features of half the
keys); an alert manager (no delivery target) and a `DriftMonitor`.

Timed:
- the first monitor cycle (every window evaluated, alerts stored), per window; baseline in the
  same run: `report_drift` alone over the same merged windows;
- an idle cycle (nothing new);
- (not a time) false-alarm feature episodes on the undrifted keys per 1,000 feature-window tests;
- one `/metrics` render (`FleetMetrics.render`, median of 20); baseline in the same run: a
  plain prometheus_client registry holding the same number of pre-set gauge samples.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.metrics import FleetMetrics, MetricSources
from fleet.registry.profile import compute_reference_profile
from fleet.settings import TelemetrySettings
from fleet.store import Store
from fleet.telemetry.alerts import AlertManager
from fleet.telemetry.drift import report_drift
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from fleet.telemetry.monitor import DriftMonitor

NAME = "fleet_metrics"
DESCRIPTION = "drift monitor cycle per window and /metrics scrape time over a populated fleet"
DEVICES = 1000
ROLLOUTS = 20
KEYS = 8
WINDOWS = 30
T0 = 1_700_000_000.0


def _fleet(store: Store) -> None:
    for i in range(DEVICES):
        dev = f"dev-{i:05d}"
        store.devices.create(dev, {"env": "prod"}, {"agent_version": f"0.{i % 3}.0"}, dev, "x", "bench")
        store.devices.record_reported_state(dev, {"device_id": dev, "state": ("idle", "probation")[i % 2],
                                                  "online": i % 5 != 0})
    store.models.create_model("mlp", "", "bench")
    store.models.register_version("mlp", "1.0.0", "sha256:" + "ab" * 32, "onnx", {}, "bench")
    for r in range(ROLLOUTS):
        rid = store.rollouts.create("mlp:1.0.0", "env=prod", {}, {}, "bench").id
        for d in range(50):
            store.rollouts.set_device_status(rid, f"dev-{(r * 50 + d) % DEVICES:05d}", 0,
                                             ("assigned", "succeeded", "failed")[d % 3])


def _telemetry(path: Path) -> tuple[TelemetryStore, object]:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20_000, 20))
    prof = compute_reference_profile(ref, [f"f{i}" for i in range(20)], outputs=ref[:, :3].sum(axis=1))
    store = TelemetryStore(path, IngestConfig(window_s=60.0), profiles=lambda m, v: prof,
                           clock=lambda: T0 + 10 * 86400)
    shift = np.zeros(20)
    shift[[2, 7, 11]] = 1.0
    for k in range(KEYS):
        version, cohort = f"1.{k // 4}.0", f"c{k % 4}"
        for d in range(2):
            ticks = iter([T0 + 60.0 * i + 1 for i in range(WINDOWS + 1)])
            sk = TelemetrySketch(prof, f"{version}-{cohort}-{d}", "mlp", version, cohort=cohort,
                                 clock=ticks.__next__, resource_probe=lambda: (0, 0.0, 0.0))
            for _ in range(WINDOWS):
                x = rng.normal(size=(200, 20)) + (shift if k % 2 else 0.0)
                sk.update(x, x[:, :3].sum(axis=1), 0.002)
                store.ingest(encode_report(sk.snapshot_and_reset()))
    store.flush()
    return store, prof


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = Store(root / "fleet.db")
        _fleet(store)
        telemetry, prof = _telemetry(root / "telemetry.db")
        alerts = AlertManager(root / "alerts.db")
        now = T0 + 60.0 * (WINDOWS + 2) + 30
        monitor = DriftMonitor(telemetry, alerts, lambda m, v: prof,  # type: ignore[arg-type,return-value]
                               TelemetrySettings(lookback_s=10 * 86400.0), clock=lambda: now)
        windows = [w for m, v, c in telemetry.window_keys() for w in telemetry.windows(m, v, c)]
        t0 = time.perf_counter()
        for w in windows:
            report_drift(prof, w["report"])  # type: ignore[arg-type]
        drift_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        fired = monitor.run_once()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        monitor.run_once()
        idle = time.perf_counter() - t0

        metrics = FleetMetrics(lambda api: MetricSources(store=store, telemetry=telemetry, alerts=alerts,
                                                         drift=monitor, ingest_timer=monitor.ingest_timer,
                                                         api=api))
        body = metrics.render()
        samples = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
        scrapes = []
        for _ in range(20):
            t0 = time.perf_counter()
            metrics.render()
            scrapes.append(time.perf_counter() - t0)
        from prometheus_client import CollectorRegistry, Gauge, generate_latest

        static = CollectorRegistry()
        gauge = Gauge("bench_static", "same number of samples", ["i"], registry=static)
        for i in range(samples):
            gauge.labels(str(i)).set(i)
        baseline = []
        for _ in range(20):
            t0 = time.perf_counter()
            generate_latest(static)
            baseline.append(time.perf_counter() - t0)
        monitor.stop()
        telemetry.close()
        store.close()
    n = len(windows)
    # keys with odd k (cohorts c1, c3) carry drift; alerts on the others are false alarms
    false = [a for a in fired if a.cohort in ("c0", "c2") and a.kind == "drift" and a.subject.startswith("f")]
    tests = (KEYS // 2) * WINDOWS * 20
    return {
        "fleet_metrics.windows_evaluated": float(n),
        "fleet_metrics.alerts_fired": float(len(fired)),
        "fleet_metrics.false_feature_episodes_per_1000_tests": 1e3 * len(false) / tests,
        "fleet_metrics.first_cycle_s": first,
        "fleet_metrics.first_cycle_per_window_ms": 1e3 * first / n,
        "fleet_metrics.baseline_report_drift_per_window_ms": 1e3 * drift_alone / n,
        "fleet_metrics.idle_cycle_ms": 1e3 * idle,
        "fleet_metrics.scrape_samples": float(samples),
        "fleet_metrics.scrape_ms": 1e3 * statistics.median(scrapes),
        "fleet_metrics.baseline_static_registry_ms": 1e3 * statistics.median(baseline),
    }
