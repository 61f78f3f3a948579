"""Collected rows carry their labels where known: a row the sampler keeps remembers the
prediction id it was served under, and a label the feedback log matches for that id while the
sample is still held travels in the archive's `labels` column. A label after the sample was
closed, for an unknown id, past the horizon, or for a row the sampler replaced, does not."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner, Signer

from agent.contract.collect import CollectPolicy, decode_chunk
from agent.contract.director import DirectorDocument, DirectorTrust, TargetRef, sign_director
from agent.contract.manifest import FeatureProfile, Manifest, ReferenceProfile
from agent.contract.protocol import Topics
from agent.daemon.collection import CollectionRunner
from agent.daemon.serving import ModelCatalog, TelemetryTap
from agent.serving.api import InferenceService
from agent.telemetry.collect import SampleCollector
from agent.telemetry.feedback import FeedbackConfig, PredictionLog
from agent.telemetry.queue import ReportQueue
from simulators.models import make_mlp_onnx, mlp_manifest
from tests.support.fakes import FakeClock

WIDTH, CLASSES = 8, 4
POLICY = CollectPolicy(policy_id="col-l", max_rows=30, max_seconds=10, chunk_bytes=1024, seed=1)


class _Done:
    def is_published(self) -> bool:
        return True


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.connected = True

    def publish(self, topic: str, payload: bytes, qos: int = 1, **_: object) -> _Done:
        self.sent.append(payload)  # (user properties, e.g. a chunk's signature, are not looked at)
        return _Done()


class FakePredictor:
    """Echoes logits whose argmax is the first feature mod 4 (a classifier of 4 classes)."""

    def __init__(self, tap: TelemetryTap, bundle: str) -> None:
        self.tap, self.bundle = tap, bundle

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        out = {"logits": np.eye(CLASSES, dtype=np.float32)[x[:, 0].astype(int) % CLASSES] * 0.9 + 0.025}
        self.tap.fold(self.bundle, inputs, out, 0.001, False)
        return out

    def info(self) -> dict[str, Any]:
        return {"name": "mlp", "version": "1.0.0", "bundle_id": self.bundle}


def _manifest() -> Manifest:
    num = {"kind": "numeric", "edges": [-2.0, 0.0, 2.0]}
    profile = ReferenceProfile(
        input_name="x",
        features=[FeatureProfile(name=f"f{i}", **num) for i in range(WIDTH)],  # type: ignore[arg-type]
        outputs=[FeatureProfile(name=f"logits_{i}", **num) for i in range(CLASSES)],  # type: ignore[arg-type]
    )
    return mlp_manifest(make_mlp_onnx(0)).model_copy(update={"reference_profile": profile})


@pytest.fixture(scope="module")
def signer() -> Signer:
    return CryptoSigner.generate_ed25519()


class Device:
    """The serving glue and the collection runner of one agent, with fake clocks."""

    def __init__(self, tmp: Path, signer: Signer) -> None:
        manifest = _manifest()
        self.bundle = f"{manifest.name}-{manifest.version}"
        catalog = ModelCatalog(1)
        catalog.manifests[self.bundle] = manifest
        self.label_clock, self.clock, self.transport = FakeClock(), FakeClock(), FakeTransport()
        self.log = PredictionLog(FeedbackConfig(horizon_s=60), clock=self.label_clock)
        self.tap = TelemetryTap(ReportQueue(tmp / "q.sqlite"), catalog, "dev-1", "", self.log)
        trust = DirectorTrust(keys={signer.public_key.keyid: signer.public_key}, threshold=1)
        self.runner = CollectionRunner(tmp, "dev-1", [], lambda: trust, self.transport,  # type: ignore[arg-type]
                                       Topics("ef", "dev-1"), clock=self.clock, sink=self.tap)
        self.service = InferenceService(FakePredictor(self.tap, self.bundle), feedback=self.tap)
        now = datetime.now(UTC).replace(microsecond=0)
        ref = TargetRef(path="models/mlp/x.efb", length=1, sha256="a" * 64, name=manifest.name,
                        version=manifest.version)
        doc = DirectorDocument(device_id="dev-1", cohort=None, sequence=1, issued_at=now,
                               expires=now + timedelta(days=1), target=ref, collect=POLICY)
        self.runner.on_document(sign_director(doc, [signer]), 0)
        self.served = 0

    def serve(self, rows: int) -> tuple[np.ndarray, list[str]]:
        x = np.zeros((rows, WIDTH), np.float32)
        x[:, 0] = np.arange(self.served, self.served + rows)  # row n has first feature n
        self.served += rows
        _, _, ids = self.service.predict_ids({"x": x})
        assert ids is not None and len(ids) == rows
        return x, ids

    def label(self, pairs: list[tuple[object, object]]) -> dict[str, int]:
        return self.service.submit_feedback([{"prediction_id": p, "label": v} for p, v in pairs])

    def archive(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        chunks = [decode_chunk(p) for p in self.transport.sent]
        with np.load(io.BytesIO(b"".join(c.data for c in chunks)), allow_pickle=False) as z:
            return z["x"], z["labels"], json.loads(bytes(z["meta"]))


@pytest.mark.integration
def test_a_label_sent_while_the_row_is_held_is_in_the_uploaded_sample(tmp_path: Path, signer: Signer) -> None:
    d = Device(tmp_path, signer)
    _, ids = d.serve(4)
    _, more = d.serve(4)
    assert d.label([(ids[0], 2), (ids[1], 1), (more[3], 3)])["matched"] == 3
    assert d.label([("0000beef-1", 1), (f"{d.log.epoch}-99999", 1)])["unknown"] == 2  # made up / not issued
    assert d.label([(ids[0], 0)])["duplicate"] == 1  # a second label does not overwrite the first
    d.label_clock.advance(61)  # past the feedback horizon
    assert d.label([(ids[2], 1)])["expired"] == 1
    d.clock.advance(11)
    d.runner.tick()  # the sample closes and goes up
    assert d.runner.phase == "done"
    assert d.label([(ids[3], 1)])["expired"] == 1  # after the upload (and past the horizon): not in it
    x, labels, meta = d.archive()
    assert x.shape == (8, WIDTH) and labels.shape == (8,)
    by_row = {int(r): lab for r, lab in zip(x[:, 0], labels, strict=True)}
    assert by_row[0] == 2 and by_row[1] == 1 and by_row[7] == 3
    assert all(np.isnan(by_row[r]) for r in (2, 3, 4, 5, 6))
    assert meta["labelled"] == 3 and d.runner.state is not None and d.runner.state["labelled"] == 3


@pytest.mark.integration
def test_a_label_after_the_sample_closed_is_not_attached(tmp_path: Path, signer: Signer) -> None:
    d = Device(tmp_path, signer)
    _, ids = d.serve(2)
    d.transport.connected = False  # the sample closes but cannot go up yet: it is held on disk
    d.clock.advance(11)
    d.runner.tick()
    assert d.runner.phase == "uploading"
    assert d.label([(ids[0], 1)])["matched"] == 1  # the feedback log takes it (its metrics count it)
    d.transport.connected = True
    d.runner.tick()
    _, labels, meta = d.archive()
    assert np.isnan(labels).all() and meta["labelled"] == 0  # the archive was closed before


@pytest.mark.integration
def test_labels_for_another_bundle_or_without_a_policy_are_ignored(tmp_path: Path, signer: Signer) -> None:
    d = Device(tmp_path, signer)
    _, ids = d.serve(2)
    d.runner.on_labels("other-2.0.0", ids, [1.0, 1.0])  # not the bundle the policy names
    d.clock.advance(11)
    d.runner.tick()
    _, labels, _ = d.archive()
    assert np.isnan(labels).all()
    idle = CollectionRunner(tmp_path / "idle", "dev-1", [], lambda: DirectorTrust(keys={}, threshold=1),
                            FakeTransport(), Topics("ef", "dev-1"))  # type: ignore[arg-type]
    idle.on_labels(d.bundle, ids, [1.0, 1.0])  # no policy: nothing held, nothing to do
    assert idle.state is None


@pytest.mark.unit
@pytest.mark.parametrize("strategy", ["reservoir", "low_confidence"])
def test_caps_hold_and_a_replaced_row_forgets_its_id(strategy: str) -> None:
    policy = CollectPolicy(policy_id="cap", strategy=strategy, max_rows=5, seed=2)  # type: ignore[arg-type]
    c = SampleCollector(policy, 2, "dev-1", FakeClock())
    x = np.stack([np.arange(100.0), np.zeros(100)], axis=1)
    ids = [f"e-{n}" for n in range(100)]
    conf = np.random.default_rng(0).random(100)
    for start in range(0, 100, 10):
        c.offer(x[start : start + 10], conf[start : start + 10], ids[start : start + 10])
    assert c.label(ids, [float(n) + 0.5 for n in range(100)]) == 5  # only the rows still kept
    c.offer(x[:3], conf[:3], ids[:1])  # ids not one per row: rows taken, none linked
    with np.load(io.BytesIO(c.archive()), allow_pickle=False) as z:
        kept, labels = z["x"], z["labels"]
    assert len(kept) == 5 and labels.shape == (5,)
    linked = ~np.isnan(labels)
    np.testing.assert_array_equal(labels[linked], kept[linked, 0] + 0.5)  # each label on its own row
    assert c.label(["e-x", "e-1000"], [1.0, 1.0]) == 0
    assert c.label([ids[int(kept[linked][0, 0])]], [float("nan")]) == 0  # NaN is not a label
