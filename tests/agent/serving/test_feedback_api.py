"""Prediction ids and labels through the real local API (HTTP and Unix socket), the daemon's
serving glue (holder, catalog, telemetry tap) and a real MLP: labels sent later end up in the
report the agent queues for the fleet."""

from __future__ import annotations

import http.client
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.contract.manifest import (
    CONFIDENCE_BINS,
    Calibration,
    FeatureProfile,
    PerformanceSpec,
    ReferenceProfile,
)
from agent.contract.performance import FEEDBACK_OUTCOMES
from agent.contract.telemetry import TelemetryReport
from agent.contract.telemetry_codec import decode_report
from agent.daemon.served_model import ServedModel
from agent.daemon.serving import ModelCatalog, TelemetryTap
from agent.errors import MessageError, RequestTooLargeError
from agent.serving.api import ApiLimits, PredictorSlot
from agent.serving.client import HttpInferenceClient, UnixInferenceClient
from agent.serving.http_server import HttpInferenceServer
from agent.serving.model_holder import ModelHolder
from agent.serving.unix_server import UnixInferenceServer
from agent.telemetry.feedback import FeedbackConfig, PredictionLog
from agent.telemetry.queue import ReportQueue
from simulators.models import make_mlp_onnx, mlp_manifest, mlp_reference, mlp_weights
from tests.support.fakes import FakeClock

pytestmark = pytest.mark.integration

X = np.random.default_rng(3).standard_normal((40, 32)).astype(np.float32)
LIMITS = ApiLimits(max_body_bytes=256 * 1024, max_batch=50, max_connections=8, idle_timeout_s=10)
CAL = Calibration(knots_x=[0.25, 0.6, 1.0], knots_y=[0.3, 0.6, 0.9], bin_se=[0.01] * CONFIDENCE_BINS,
                  holdout_rows=500, holdout_accuracy=0.7)


def _profile() -> ReferenceProfile:
    num = {"kind": "numeric", "edges": [-2.0, 0.0, 2.0]}
    return ReferenceProfile(
        input_name="x",
        features=[FeatureProfile(name=f"f{i}", **num) for i in range(32)],  # type: ignore[arg-type]
        outputs=[FeatureProfile(name=f"logits_{i}", **num) for i in range(4)],  # type: ignore[arg-type]
        performance=PerformanceSpec(task="classification", classes=4, scores="logits", calibration=CAL),
    )


@dataclass
class Device:
    http: HttpInferenceClient
    unix: UnixInferenceClient
    tap: TelemetryTap
    queue: ReportQueue
    clock: FakeClock
    bundle_id: str

    def report(self) -> TelemetryReport:
        seq = self.tap.flush(self.bundle_id)
        assert seq is not None
        return decode_report(dict(self.queue.pending())[seq])


@pytest.fixture
def device() -> Iterator[Device]:
    d = Path(tempfile.mkdtemp(prefix="ef-fb-", dir="/tmp"))
    model = make_mlp_onnx(0)
    (d / "model.onnx").write_bytes(model)
    manifest = mlp_manifest(model).model_copy(update={"reference_profile": _profile()})
    catalog = ModelCatalog(threads=1)
    holder = ModelHolder()
    holder.swap(catalog.load(d / "model.onnx", manifest, 1), manifest.bundle_id, keep_previous=False)
    clock = FakeClock()
    queue = ReportQueue(d / "telemetry.sqlite")
    tap = TelemetryTap(queue, catalog, "dev-1", "lab",
                       PredictionLog(FeedbackConfig(capacity=64, horizon_s=600, max_batch=50), clock=clock))
    served = ServedModel(holder, catalog, tap)
    http_server = HttpInferenceServer(served, port=0, limits=LIMITS, feedback=tap).start()
    unix_server = UnixInferenceServer(served, d / "agent.sock", LIMITS, feedback=tap).start()
    http, unix = HttpInferenceClient(port=http_server.port), UnixInferenceClient(d / "agent.sock")
    try:
        yield Device(http, unix, tap, queue, clock, manifest.bundle_id)
    finally:
        http.close()
        unix.close()
        http_server.stop()
        unix_server.stop()
        holder.close()
        shutil.rmtree(d, ignore_errors=True)


def _classes(x: np.ndarray) -> list[int]:
    return [int(v) for v in np.argmax(mlp_reference(x, mlp_weights(0)), axis=1)]


def test_labels_sent_later_over_both_transports_fold_into_the_queued_report(device: Device) -> None:
    device.http.predict({"x": X[:3]})
    http_ids = device.http.last_prediction_ids
    device.unix.predict({"x": X[3:5]})
    unix_ids = device.unix.last_prediction_ids
    device.http.predict_npy(X[5:9])
    npy_ids = device.http.last_prediction_ids
    assert len(http_ids) == 3 and len(unix_ids) == 2 and len(npy_ids) == 4
    assert len(set(http_ids + unix_ids + npy_ids)) == 9  # one id per row, all distinct
    predicted = _classes(X[:9])
    truth = [p if i % 3 else (p + 1) % 4 for i, p in enumerate(predicted)]  # every third one wrong
    ids = http_ids + unix_ids + npy_ids
    first = device.http.feedback(dict(zip(ids[:5], truth[:5], strict=True)))
    assert first == {"matched": 5, "unknown": 0, "expired": 0, "duplicate": 0, "invalid": 0}
    second = device.unix.feedback({**dict(zip(ids[5:], truth[5:], strict=True)), ids[0]: truth[0],
                                   "nope-1": 0, ids[1]: 9})
    assert second == {"matched": 4, "unknown": 1, "expired": 0, "duplicate": 2, "invalid": 0}
    rep = device.report()
    p = rep.performance
    assert p is not None and p.task == "classification"
    expected = np.zeros((4, 4), np.int64)
    for t, q in zip(truth, predicted, strict=True):
        expected[t, q] += 1
    assert p.confusion.tolist() == expected.tolist()
    assert p.confidence_counts.sum() == 9  # every served row's calibrated confidence
    fb = dict(zip(FEEDBACK_OUTCOMES, p.feedback.tolist(), strict=True))
    assert fb == {"matched": 9, "unknown": 1, "expired": 0, "duplicate": 2, "invalid": 0}


def test_unknown_expired_and_invalid_labels_are_counted_not_errors(device: Device) -> None:
    device.http.predict({"x": X[:2]})
    ids = device.http.last_prediction_ids
    device.clock.advance(601)  # past the 600 s horizon
    device.http.predict({"x": X[2:3]})
    fresh = device.http.last_prediction_ids[0]
    counts = device.http.feedback({ids[0]: 1, "made-up": 1, fresh: 42})
    assert counts == {"matched": 0, "unknown": 1, "expired": 1, "duplicate": 0, "invalid": 1}
    assert device.http.health()["status"] == "ok"  # nothing crashed
    assert device.http.feedback({fresh: 1})["matched"] == 1  # the invalid label did not use it up


def test_malformed_and_oversized_feedback_get_the_api_error_shape(device: Device) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", device.http.port, timeout=5)
    for body, status, code in [
        (b"{not json", 400, "bad_request"),
        (b'{"labels": {"a": 1}}', 400, "bad_request"),
        (b'{"labels": [{"prediction_id": "x"}]}', 400, "bad_request"),
        (b'{"label": []}', 400, "bad_request"),
        (json.dumps({"labels": [{"prediction_id": "x", "label": 1}] * 51}).encode(), 413, "too_large"),
    ]:
        conn.request("POST", "/v1/feedback", body=body, headers={"Content-Type": "application/json"})
        res = conn.getresponse()
        doc = json.loads(res.read())
        assert res.status == status and doc["error"]["code"] == code, (body[:40], doc)
        assert doc["error"]["message"]
    conn.request("GET", "/v1/feedback")
    res = conn.getresponse()
    res.read()
    assert res.status == 405
    conn.close()
    with pytest.raises(RequestTooLargeError):
        device.unix.feedback({f"x-{i}": 0 for i in range(51)})
    with pytest.raises(MessageError):
        device.unix.call({"op": "feedback", "labels": "all of them"})
    assert device.unix.health()["ready"]


def test_an_api_without_a_sink_serves_as_before(device: Device) -> None:
    with HttpInferenceServer(PredictorSlot(None), port=0, limits=LIMITS) as server:
        client = HttpInferenceClient(port=server.port)
        with pytest.raises(MessageError, match="feedback_disabled"):
            client.feedback({"a-1": 0})
        client.close()
