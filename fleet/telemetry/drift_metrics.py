"""The drift and model-performance metric families of `/metrics`, from the drift monitor's
latest verdicts (`fleet.telemetry.monitor.DriftMonitor.snapshot`).

They describe the *latest evaluated window* of each (model, version, cohort): Prometheus keeps
the history; their number is bounded by the keys the monitor evaluates, and per-class
performance figures stay in the API (bounded labels).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fleet.telemetry.monitor import DriftGauge


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or [])


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels or [])


class DriftSource(Protocol):
    """What the collector needs of the drift monitor."""

    def snapshot(self) -> list[DriftGauge]: ...

    @property
    def evaluations(self) -> int: ...

    @property
    def evaluation_errors(self) -> int: ...



def drift_families(drift: DriftSource | None) -> list[Metric]:
    key = ["model", "version", "cohort"]
    statistic = _gauge("edgefleet_drift_statistic", "Deciding drift statistic of a feature or output "
                       "(`output:<name>`) in the latest evaluated window", [*key, "feature", "statistic"])
    threshold = _gauge("edgefleet_drift_threshold", "Effective (widened) threshold of that statistic",
                       [*key, "feature", "statistic"])
    detected = _gauge("edgefleet_drift_detected", "1 when the feature drifted in the latest evaluated window",
                      [*key, "feature"])
    share = _gauge("edgefleet_drift_share", "Share of input features that drifted", key)
    dataset = _gauge("edgefleet_dataset_drift", "1 when the share reaches the dataset drift threshold", key)
    prediction = _gauge("edgefleet_prediction_drift", "1 when any model output drifted", key)
    window = _gauge("edgefleet_drift_window_start_seconds", "Start of the latest evaluated window (Unix s)",
                    key)
    evaluations = _counter("edgefleet_drift_evaluations", "Windows evaluated for drift since start")
    errors = _counter("edgefleet_drift_evaluation_errors", "Drift evaluations that failed since start")
    if drift is not None:
        for g in drift.snapshot():
            labels = [g.model, g.version, g.cohort]
            for f in [*g.report.features, *[_as_output(o) for o in g.report.outputs]]:
                if f.method == "insufficient":
                    continue
                statistic.add_metric([*labels, f.name, f.method], f.statistic)
                threshold.add_metric([*labels, f.name, f.method], f.threshold)
                detected.add_metric([*labels, f.name], float(f.drifted))
            share.add_metric(labels, g.report.drifted_share)
            dataset.add_metric(labels, float(g.report.dataset_drift))
            prediction.add_metric(labels, float(g.report.prediction_drift))
            window.add_metric(labels, g.window_start)
        evaluations.add_metric([], drift.evaluations)
        errors.add_metric([], drift.evaluation_errors)
    return [statistic, threshold, detected, share, dataset, prediction, window, evaluations, errors,
            *performance_families(drift)]


def performance_families(drift: DriftSource | None) -> list[Metric]:
    """Accuracy (realised from device labels, estimated without them) and MAE of the latest
    evaluated window per key: bounded like the drift series (no per-class series here; the
    API has precision and recall per class)."""
    key = ["model", "version", "cohort"]
    accuracy = _gauge("edgefleet_model_accuracy", "Accuracy of the latest evaluated window: kind=realised "
                      "(from labels), estimated (CBPE), estimated_low / estimated_high (95 % band)",
                      [*key, "kind"])
    mae = _gauge("edgefleet_model_mae", "Mean absolute error of a regressor in the latest evaluated window",
                 key)
    labels_ = _gauge("edgefleet_model_labels", "Labels sent for the latest evaluated window, by outcome "
                     "(matched, unknown, expired, duplicate, invalid)", [*key, "outcome"])
    for g in drift.snapshot() if drift is not None else []:
        p = g.performance
        if p is None:
            continue
        labels = [g.model, g.version, g.cohort]
        for kind, value in (("realised", p.accuracy), ("estimated", p.estimated_accuracy),
                            ("estimated_low", p.estimate_low), ("estimated_high", p.estimate_high)):
            if value is not None:
                accuracy.add_metric([*labels, kind], value)
        if p.mae is not None:
            mae.add_metric(labels, p.mae)
        for outcome, n in p.feedback.items():
            labels_.add_metric([*labels, outcome], n)
    return [accuracy, mae, labels_]


def _as_output(o: Any) -> Any:
    return replace(o, name=f"output:{o.name}")
