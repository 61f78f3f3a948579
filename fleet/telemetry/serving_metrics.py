"""The model-serving metric families of `/metrics`, built from the serving totals.

Per (model, version, cohort), never per device, so the series grow with versions and cohorts
only (the caller caps how many keys it passes: `fleet.metrics.SERVING_LOOKBACK_S` and
`max_serving_series`): requests, errors and rejected requests as counters, the latency
histogram, CPU seconds, and the latest window's peak RSS and reporting devices; plus devices
by the bundle they report active and whether they are online (the inventory).

The histogram's `le` bounds are 2^k µs, each the upper bound of the reports' log bucket 4k
(agent/contract/telemetry.py), so the coarser Prometheus buckets are exact sums of the
devices' buckets, not interpolations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from agent.contract.telemetry import latency_bucket_upper
from fleet.db.sql import json_field
from fleet.telemetry.serving import ServingTotals

if TYPE_CHECKING:
    from fleet.store import Store

#: indices of the reports' latency buckets used as `le` bounds: 2^5 µs (32 µs) .. 2^25 µs (33.5 s)
SERVING_BUCKET_INDEX = tuple(range(20, 101, 4))
KEY = ["model", "version", "cohort"]


def serving_families(totals: list[ServingTotals], store: Store | None) -> list[Metric]:
    """Every family, exported even when empty (the dashboard's queries always find the name)."""
    requests = CounterMetricFamily("edgefleet_model_requests", "Inference requests served (errors included)",
                                   labels=KEY)
    errors = CounterMetricFamily("edgefleet_model_errors", "Inference requests that failed", labels=KEY)
    rejected = CounterMetricFamily("edgefleet_model_rejected",
                                   "Requests refused before inference (invalid input, overload)", labels=KEY)
    latency = HistogramMetricFamily("edgefleet_model_latency_seconds", "Inference latency on the devices",
                                    labels=KEY)
    cpu = CounterMetricFamily("edgefleet_model_cpu_seconds", "CPU seconds (user + system) the agents spent",
                              labels=KEY)
    rss = GaugeMetricFamily("edgefleet_model_rss_max_bytes",
                            "Peak resident memory of any agent in the latest window", labels=KEY)
    reporting = GaugeMetricFamily("edgefleet_model_devices_reporting",
                                  "Devices that reported in the latest window", labels=KEY)
    devices = GaugeMetricFamily("edgefleet_model_devices",
                                "Unrevoked devices by the bundle they report active, and online",
                                labels=["bundle", "online"])
    bounds = [repr(latency_bucket_upper(i)) for i in SERVING_BUCKET_INDEX]
    for t in totals:
        labels = [t.model, t.version, t.cohort]
        requests.add_metric(labels, t.requests)
        errors.add_metric(labels, t.errors)
        rejected.add_metric(labels, t.rejected)
        cumulative = np.cumsum(t.latency_counts)
        buckets = [(b, float(cumulative[i])) for b, i in zip(bounds, SERVING_BUCKET_INDEX, strict=True)]
        latency.add_metric(labels, [*buckets, ("+Inf", float(cumulative[-1]))], t.latency_sum_s)
        cpu.add_metric(labels, t.cpu_s)
        rss.add_metric(labels, t.rss_max_bytes)
        reporting.add_metric(labels, t.devices)
    if store is not None:
        with store.read() as db:
            bundle_of = json_field(db.dialect, "reported_state", "active_bundle")
            rows = db.execute(
                f"SELECT coalesce({bundle_of}, 'none'), online, count(*) "  # noqa: S608
                "FROM devices WHERE revoked = 0 GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        for bundle, online, n in rows:
            devices.add_metric([str(bundle), "true" if online else "false"], n)
    return [requests, errors, rejected, latency, cpu, rss, reporting, devices]
