"""`owned_copy`: a window's first report, copied so merging into it leaves the received one as it was."""

from __future__ import annotations

import numpy as np
import pytest

from agent.contract.telemetry import CategoricalSketch, NumericSketch, Resources, TelemetryReport, merge_into
from fleet.telemetry.ingest import owned_copy

pytestmark = pytest.mark.unit


def _report(seq: int) -> TelemetryReport:
    return TelemetryReport(
        device_id="dev-1", seq=seq, model="mlp", version="1.0.0", interval_start=0.0, interval_end=60.0,
        features=[NumericSketch(np.array([1, 2, 250], np.uint8), nan_count=1, min=0.5, max=2.0, sum=3.0),
                  CategoricalSketch(np.array([4, 0], np.uint16), unseen={"x": 2}, unseen_error=1)],
        outputs=[NumericSketch(np.array([0, 7], np.uint32))],
        latency_counts=np.arange(4, dtype=np.int64), requests=10, resources=Resources(100, 1.0, 0.5))


def test_the_copy_equals_the_report_and_owns_int64_arrays() -> None:
    report = _report(1)
    copy = owned_copy(report)
    for a, b in zip(copy.features + copy.outputs, report.features + report.outputs, strict=True):
        assert type(a) is type(b) and a.counts.dtype == np.int64 and np.array_equal(a.counts, b.counts)
        assert not np.shares_memory(a.counts, b.counts)
    assert copy.seq == 1 and copy.requests == 10 and copy.resources == report.resources
    assert not np.shares_memory(copy.latency_counts, report.latency_counts)


def test_merging_into_the_copy_leaves_the_received_report_unchanged_and_does_not_wrap() -> None:
    first, second = _report(1), _report(2)
    acc = owned_copy(first)
    merge_into(acc, second)
    assert acc.features[0].counts.tolist() == [2, 4, 500]  # past uint8's 255
    assert first.features[0].counts.tolist() == [1, 2, 250]
    assert isinstance(acc.features[1], CategoricalSketch) and isinstance(first.features[1], CategoricalSketch)
    assert acc.features[1].unseen == {"x": 4} and first.features[1].unseen == {"x": 2}
    assert acc.latency_counts.tolist() == [0, 2, 4, 6] and first.latency_counts.tolist() == [0, 1, 2, 3]
