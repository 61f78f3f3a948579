"""The agent's own Prometheus metrics: serving counts in the text exposition format, pure.

Why here and not through prometheus_client: the agent extra does not depend on it, and what
the agent exposes is a handful of counters it already keeps for its telemetry reports
(`agent.daemon.serving.TelemetryTap` adds up every closed interval and the open one), so the
text format (version 0.0.4) is written directly. The series are per model version, the same
figures the fleet exports per version and cohort (`edgefleet_model_*`), but for this device
only and without waiting for a report to travel: what a local Prometheus or node exporter
scrapes from `GET /metrics` on the agent's HTTP API (127.0.0.1 by default).

The histogram's `le` bounds are the reports' own log buckets 4k (2^k µs, 32 µs .. 33.5 s),
as at the fleet, so both expositions agree bucket for bucket.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from agent.contract.telemetry import LATENCY_BUCKETS, latency_bucket_upper

BUCKET_INDEX = tuple(range(20, 101, 4))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ServingCounts:
    """One model version's served, failed and refused requests and latency, since the agent started."""

    model: str
    version: str
    requests: int = 0
    errors: int = 0
    rejected: int = 0
    latency_counts: np.ndarray = field(default_factory=lambda: np.zeros(LATENCY_BUCKETS, np.int64))
    latency_sum_s: float = 0.0

    def plus(self, requests: int, errors: int, rejected: int, latency_counts: np.ndarray,
             latency_sum_s: float) -> ServingCounts:
        """A new record with these counts added (the stored one is never changed in place)."""
        counts = np.asarray(latency_counts, dtype=np.int64)
        if counts.size != LATENCY_BUCKETS:
            counts = np.zeros(LATENCY_BUCKETS, np.int64)
        return ServingCounts(self.model, self.version, self.requests + requests, self.errors + errors,
                             self.rejected + rejected, self.latency_counts + counts,
                             self.latency_sum_s + latency_sum_s)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(counts: Iterable[ServingCounts], cohort: str) -> bytes:
    """The exposition of every version's counts (families present even without samples)."""
    rows = list(counts)
    out: list[str] = []

    def family(name: str, kind: str, doc: str) -> None:
        out.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}"])

    def labels(c: ServingCounts, extra: str = "") -> str:
        base = f'model="{_label(c.model)}",version="{_label(c.version)}",cohort="{_label(cohort)}"'
        return "{" + base + (f",{extra}" if extra else "") + "}"

    for name, attr, doc in (("edgefleet_agent_requests_total", "requests", "Inference requests served"),
                            ("edgefleet_agent_errors_total", "errors", "Inference requests that failed"),
                            ("edgefleet_agent_rejected_total", "rejected",
                             "Requests refused before inference (invalid input, overload)")):
        family(name, "counter", doc)
        out += [f"{name}{labels(c)} {getattr(c, attr)}" for c in rows]
    name = "edgefleet_agent_latency_seconds"
    family(name, "histogram", "Inference latency on this device")
    for c in rows:
        cumulative = np.cumsum(c.latency_counts)
        for i in BUCKET_INDEX:
            bucket = labels(c, 'le="' + repr(latency_bucket_upper(i)) + '"')
            out.append(f"{name}_bucket{bucket} {int(cumulative[i])}")
        top = labels(c, 'le="+Inf"')
        out.append(f"{name}_bucket{top} {int(cumulative[-1])}")
        out.append(f"{name}_sum{labels(c)} {c.latency_sum_s!r}")
        out.append(f"{name}_count{labels(c)} {int(cumulative[-1])}")
    return ("\n".join(out) + "\n").encode()
