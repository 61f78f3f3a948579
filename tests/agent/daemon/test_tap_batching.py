"""The telemetry tap batches served requests before folding them: the interval it reports must
be the one per-request folding gives (counts, latency histogram, feature sketches), including
across a bundle change, errors, rejected requests and inputs that do not fit the profile."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.contract.telemetry import TelemetryReport
from agent.contract.telemetry_codec import decode_report
from agent.daemon.serving import FOLD_BATCH_ROWS, ModelCatalog, TelemetryTap
from agent.telemetry.queue import ReportQueue
from agent.telemetry.sketch import TelemetrySketch
from simulators.models import make_mlp_onnx
from tests.support.serving_wire import classifier_mlp_manifest, profiled_mlp_manifest

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ef-tap-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _reports(queue: ReportQueue) -> list[TelemetryReport]:
    return [decode_report(body) for _, body in queue.pending()]


def _same(a: TelemetryReport, b: TelemetryReport) -> None:
    fields = ("model", "version", "requests", "errors", "rejected")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    np.testing.assert_array_equal(a.latency_counts, b.latency_counts)
    assert a.latency_sum_s == pytest.approx(b.latency_sum_s) and a.latency_max_s == b.latency_max_s
    for fa, fb in zip(a.features + a.outputs, b.features + b.outputs, strict=True):
        assert type(fa) is type(fb)
        np.testing.assert_array_equal(fa.counts, fb.counts)
        assert (fa.nan_count, fa.min, fa.max) == (fb.nan_count, fb.min, fb.max)  # type: ignore[union-attr]
        assert fa.sum == pytest.approx(fb.sum, rel=1e-6, abs=1e-6)  # type: ignore[union-attr]


def test_batched_folding_reports_what_per_request_folding_would(workdir: Path) -> None:
    m1, m2 = profiled_mlp_manifest("1.0.0"), profiled_mlp_manifest("2.0.0")
    catalog = ModelCatalog(threads=1)
    catalog.manifests = {m1.bundle_id: m1, m2.bundle_id: m2}
    queue = ReportQueue(workdir / "t.sqlite")
    tap = TelemetryTap(queue, catalog, "dev", "c")
    refs = {bid: TelemetrySketch(m.reference_profile, "dev", m.name, m.version, cohort="c")
            for bid, m in ((m1.bundle_id, m1), (m2.bundle_id, m2))}
    rng = np.random.default_rng(1)
    plan = [(m1.bundle_id, 1 + i % 5) for i in range(FOLD_BATCH_ROWS)] + [(m2.bundle_id, 3)] * 40
    for i, (bid, rows) in enumerate(plan):
        x = rng.standard_normal((rows, 32)).astype(np.float32)
        y = rng.standard_normal((rows, 4)).astype(np.float32)
        latency = 1e-5 * (1 + i % 17)
        view = np.frombuffer(bytearray(x.tobytes()), np.float32).reshape(rows, 32)  # like the socket's buffer
        tap.fold(bid, {"x": view}, {"logits": y}, latency, False)
        view[:] = 99.0  # the buffer is reused by the next request: the tap must have copied
        refs[bid].update(x, y, latency, False)
        if i % 50 == 7:  # an engine failure and a refused request in between
            tap.fold(bid, {"x": x}, None, 2e-3, True)
            refs[bid].update(x, None, 2e-3, True)
            tap.rejected(bid)
            refs[bid].record_rejected()
    tap.fold(m2.bundle_id, {"x": np.zeros((2, 31), np.float32)}, {"logits": np.zeros((2, 4))}, 1e-5, False)
    refs[m2.bundle_id].record_rejected()  # 31 columns: outside the profile, counted as rejected
    tap.flush(None)
    got = _reports(queue)
    assert [r.version for r in got] == ["1.0.0", "2.0.0"]
    for report, bid in zip(got, (m1.bundle_id, m2.bundle_id), strict=True):
        _same(report, refs[bid].snapshot_and_reset())


def test_a_micro_batch_counts_as_its_requests(workdir: Path) -> None:
    """The Unix server's micro-batching folds N stacked requests at once (`calls`): the interval
    counts N requests with the batch's latency each, as N separate folds would."""
    m1 = profiled_mlp_manifest("1.0.0")
    catalog = ModelCatalog(threads=1)
    catalog.manifests = {m1.bundle_id: m1}
    queue = ReportQueue(workdir / "t.sqlite")
    tap = TelemetryTap(queue, catalog, "dev", "c")
    ref = TelemetrySketch(m1.reference_profile, "dev", m1.name, m1.version, cohort="c")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    y = rng.standard_normal((5, 4)).astype(np.float32)
    tap.fold(m1.bundle_id, {"x": x}, {"logits": y}, 3e-4, False, 5)
    for i in range(5):
        ref.update(x[i:i + 1], y[i:i + 1], 3e-4, False)
    tap.flush(None)
    (report,) = _reports(queue)
    assert report.requests == 5
    _same(report, ref.snapshot_and_reset())


def test_served_requests_report_the_bundle_that_served_them_across_a_swap(workdir: Path) -> None:
    """`ServedModel.predict_served` names the bundle the holder ran (not whatever is current
    when the caller asks afterwards), counts telemetry for it, and says plainly when nothing
    is served."""
    from agent.daemon.served_model import ServedModel
    from agent.errors import NoModelLoadedError
    from agent.serving.model_holder import ModelHolder

    data = make_mlp_onnx(0)
    (workdir / "m.onnx").write_bytes(data)
    catalog, holder = ModelCatalog(threads=1), ModelHolder()
    queue = ReportQueue(workdir / "t.sqlite")
    served = ServedModel(holder, catalog, TelemetryTap(queue, catalog, "dev", "c"))
    x = np.zeros((1, 32), np.float32)
    with pytest.raises(NoModelLoadedError, match="no verified model"):
        served.predict_served({"x": x})
    m1, m2 = profiled_mlp_manifest("1.0.0"), profiled_mlp_manifest("2.0.0")
    holder.swap(catalog.load(workdir / "m.onnx", m1, 1), m1.bundle_id, keep_previous=False)
    info = served.predict_served({"x": x})[1]
    assert info["bundle_id"] == m1.bundle_id and info["version"] == "1.0.0"
    assert served.predict_served({"x": x})[1] is info  # built once per bundle

    class SwapDuring:  # a swap that lands while a request of 1.0.0 runs
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            holder.swap(catalog.load(workdir / "m.onnx", m2, 1), m2.bundle_id, keep_previous=False)
            return self.inner.predict(inputs)  # type: ignore[attr-defined,no-any-return]

    holder._current.model = SwapDuring(holder._current.model)  # type: ignore[union-attr]
    during = served.predict_served({"x": x})[1]
    assert during["bundle_id"] == m1.bundle_id  # the bundle that ran it, though 2.0.0 is current
    assert served.info()["bundle_id"] == m2.bundle_id
    assert served.predict_served({"x": x})[1]["version"] == "2.0.0"
    served.tap.flush(None)  # type: ignore[union-attr]
    assert [(r.version, r.requests) for r in _reports(queue)] == [("1.0.0", 3), ("2.0.0", 1)]


def test_ids_issued_with_the_telemetry_match_their_own_predictions_before_and_after_a_fold(
        workdir: Path) -> None:
    """`served` hands out ids at once and stores what they predicted only with the batch: a
    label sent before the batch is folded, after it, or for rows batched beside rows without
    ids (`fold`) must still meet its own prediction; an id looked up in the log before it is
    stored is expired, never somebody else's row."""
    m = classifier_mlp_manifest("1.0.0")
    catalog = ModelCatalog(threads=1)
    catalog.manifests = {m.bundle_id: m}
    tap = TelemetryTap(ReportQueue(workdir / "t.sqlite"), catalog, "dev", "c")
    rng = np.random.default_rng(4)
    issued: list[tuple[str, int]] = []
    for i in range(FOLD_BATCH_ROWS + 40):
        if i == 100:  # a label mid-batch: the rows so far are stored, the rest later
            assert tap.submit([(issued[0][0], float(issued[0][1]))])["matched"] == 1
        x = rng.standard_normal((1, 32)).astype(np.float32)
        y = rng.standard_normal((1, 4)).astype(np.float32)
        if i % 7 == 3:  # a request folded without ids, in the same batch
            tap.fold(m.bundle_id, {"x": x}, {"logits": y}, 1e-4, False)
            continue
        ids = tap.served(m.bundle_id, {"x": x}, {"logits": y}, 1e-4)
        assert ids is not None and len(ids) == 1
        issued.append((ids[0], int(y.argmax())))
    stacked = rng.standard_normal((3, 4)).astype(np.float32)
    three = tap.served(m.bundle_id, {"x": np.zeros((3, 32), np.float32)}, {"logits": stacked}, 1e-4, 3)
    assert three is not None and len(three) == 3 and len(set(three)) == 3
    issued += list(zip(three, stacked.argmax(axis=1).tolist(), strict=True))
    assert len({i for i, _ in issued}) == len(issued)  # every id its own

    pending = tap._pending_rows
    assert 0 < pending < FOLD_BATCH_ROWS  # the last rows wait for the next fold
    early = tap.predictions.match([(issued[-1][0], 1)])  # looked up before it was stored
    assert early.expired == 1 and early.matched == 0

    # labels equal to what each row predicted, for rows folded already and rows still pending
    got = tap.submit([(pid, float(cls)) for pid, cls in issued[1:-1]])
    assert got["matched"] == len(issued) - 2 and got["invalid"] == 0
    tap.flush(None)
    (report,) = _reports(tap.queue)
    perf = report.performance
    assert perf is not None and perf.labelled == len(issued) - 1
    assert int(np.trace(perf.confusion)) == len(issued) - 1  # each label met its own prediction
