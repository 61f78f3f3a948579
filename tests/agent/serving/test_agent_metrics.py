"""The agent's own `GET /metrics`: the telemetry tap's counts, over the real HTTP API.

A real `TelemetryTap` (with its real `ReportQueue`) folds served, failed and refused requests of
two bundles; the exposition must parse as Prometheus text, count the closed intervals and the
open one, keep counting after an interval is queued, and stay off servers that were not given it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.contract.manifest import Manifest
from agent.daemon.serving import ModelCatalog, TelemetryTap
from agent.serving.http_server import HttpInferenceServer
from agent.telemetry.exposition import ServingCounts, render
from agent.telemetry.queue import QueueConfig, ReportQueue
from tests.support.telemetry import small_profile

PROFILE = small_profile()


class _Stub:
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.zeros((1, 1), np.float32)}

    def info(self) -> dict[str, Any]:
        return {"name": "m", "version": "1.0.0"}


def _samples(text: str, name: str) -> dict[tuple[str, str], float]:
    """(version, le or "") -> value of one sample name."""
    return {(s.labels["version"], s.labels.get("le", "")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def _tap(tmp_path: Path) -> TelemetryTap:
    catalog = ModelCatalog(threads=1)
    for version in ("1.0.0", "2.0.0"):
        catalog.manifests[f"m-{version}"] = cast(Manifest, SimpleNamespace(
            name="m", version=version, reference_profile=PROFILE))
    queue = ReportQueue(tmp_path / "telemetry.sqlite", QueueConfig(max_reports=100, max_bytes=10**7))
    return TelemetryTap(queue, catalog, "dev-1", "eu")


@pytest.mark.integration
def test_the_agent_serves_its_counts_per_version_at_metrics(tmp_path: Path) -> None:
    tap = _tap(tmp_path)
    x = {"x": np.random.default_rng(0).normal(size=(3, 4))}
    for i in range(10):
        tap.fold("m-1.0.0", x, {"y": x["x"].sum(axis=1)}, 0.002, error=i < 2)
    tap.rejected("m-1.0.0")
    assert tap.flush("m-1.0.0") is not None  # the interval is queued: its counts stay counted
    for _ in range(4):
        tap.fold("m-1.0.0", x, {"y": x["x"].sum(axis=1)}, 0.008, error=False)
    for _ in range(3):
        tap.fold("m-2.0.0", x, None, 0.5, error=True)  # the swap closes 1.0.0's open interval
    tap.fold("m-unknown", x, None, 0.001, error=False)  # no manifest: not counted, no series

    with HttpInferenceServer(_Stub(), metrics=tap.metrics_text) as server, \
            HttpInferenceServer(_Stub()) as plain:
        res = httpx.get(f"{server.url}/metrics", timeout=10)
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert httpx.get(f"{plain.url}/metrics", timeout=10).status_code == 404  # not wired: not served
        assert httpx.post(f"{server.url}/metrics", timeout=10).status_code == 405
    text = res.text
    assert _samples(text, "edgefleet_agent_requests_total") == {("1.0.0", ""): 14, ("2.0.0", ""): 3}
    assert _samples(text, "edgefleet_agent_errors_total") == {("1.0.0", ""): 2, ("2.0.0", ""): 3}
    assert _samples(text, "edgefleet_agent_rejected_total") == {("1.0.0", ""): 1, ("2.0.0", ""): 0}
    buckets = _samples(text, "edgefleet_agent_latency_seconds_bucket")
    assert buckets[("1.0.0", "0.002048")] == 10 and buckets[("1.0.0", "0.008192")] == 14
    assert buckets[("2.0.0", "0.262144")] == 0 and buckets[("2.0.0", "0.524288")] == 3
    assert buckets[("1.0.0", "+Inf")] == 14
    assert _samples(text, "edgefleet_agent_latency_seconds_sum")[("1.0.0", "")] == pytest.approx(0.052)
    assert 'cohort="eu"' in text and "dev-1" not in text  # per version, not per device id
    tap.queue.close()


@pytest.mark.unit
def test_the_exposition_escapes_labels_and_lists_every_family_without_samples() -> None:
    empty = render([], "")
    assert [f.name for f in text_string_to_metric_families(empty.decode())] == [
        "edgefleet_agent_requests", "edgefleet_agent_errors", "edgefleet_agent_rejected",
        "edgefleet_agent_latency_seconds"]
    odd = ServingCounts('we"ird\\', "1\n2").plus(1, 0, 0, np.ones(3), 0.1)  # a foreign histogram: ignored
    families = list(text_string_to_metric_families(render([odd], "c").decode()))
    labels = families[0].samples[0].labels
    assert (labels["model"], labels["version"]) == ('we"ird\\', "1\n2")
    assert families[3].samples[-1].value == 0  # _count of the ignored histogram
