"""Opt-in data collection: a signed policy arms the device's sampler, the sample goes up in
resumable chunks, the fleet records a dataset version; nothing without a valid signature."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner, Signer

from agent.contract.collect import CollectPolicy, DatasetChunk, decode_chunk, encode_chunk
from agent.contract.director import DirectorDocument, DirectorTrust, TargetRef, sign_director
from agent.errors import MessageError
from agent.telemetry.collect import ChunkUploader, SampleCollector, collector_from_director
from fleet.errors import NotFound
from fleet.registry.datasets import DatasetStore
from tests.support.fakes import FakeClock

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
REF = TargetRef(path="models/m/m-1.0.0.efb", length=1234, sha256="a" * 64, name="m", version="1.0.0")
POLICY = CollectPolicy(policy_id="drift-b-1", strategy="reservoir", max_rows=50, chunk_bytes=1024, seed=3)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return CryptoSigner.generate_ed25519()


def _trust(signer: Signer) -> DirectorTrust:
    return DirectorTrust(keys={signer.public_key.keyid: signer.public_key}, threshold=1)


def _envelope(signer: Signer, collect: CollectPolicy | None = POLICY, cohort: str = "b") -> bytes:
    doc = DirectorDocument(cohort=cohort, sequence=7, issued_at=NOW - timedelta(hours=1),
                           expires=NOW + timedelta(days=1), target=REF, collect=collect)
    return sign_director(doc, [signer])


def _arm(envelope: bytes, signer: Signer, clock: FakeClock | None = None) -> SampleCollector | None:
    return collector_from_director(envelope, _trust(signer), "dev-1", ["b"], 6, NOW, width=3,
                                   clock=clock or FakeClock())


@pytest.mark.unit
def test_only_a_valid_signed_policy_arms_the_sampler(signer: Signer) -> None:
    good = _envelope(signer)
    assert _arm(good, signer) is not None
    doc = json.loads(good)
    doc["signed"]["collect"]["max_rows"] = 100_000  # tampered caps
    assert _arm(json.dumps(doc).encode(), signer) is None
    unsigned = {"signed": json.loads(good)["signed"], "signatures": []}
    assert _arm(json.dumps(unsigned).encode(), signer) is None
    other = CryptoSigner.generate_ed25519()
    assert _arm(_envelope(other), signer) is None  # signed, but not by a director key
    assert _arm(_envelope(signer, collect=None), signer) is None  # no policy: off by default
    assert _arm(_envelope(signer, cohort="a"), signer) is None  # another cohort's policy
    assert "collect" not in json.loads(_envelope(signer, collect=None))["signed"]  # old agents see no field


@pytest.mark.unit
def test_reservoir_is_bounded_uniform_and_stops_at_the_time_cap() -> None:
    clock = FakeClock()
    c = SampleCollector(POLICY, 3, "dev-1", clock)
    rows = np.arange(3000, dtype=np.float64).repeat(3).reshape(-1, 3)
    c.offer(rows[:2000])
    clock.advance(POLICY.max_seconds)
    c.offer(rows[2000:])  # after the cap: ignored
    with np.load(io.BytesIO(c.archive()), allow_pickle=False) as z:
        x, meta = z["x"], json.loads(bytes(z["meta"]).decode())
    assert x.shape == (50, 3) and meta["seen"] == 2000 and meta["kept"] == 50
    assert x[:, 0].max() < 2000 and x[:, 0].mean() > 500  # a sample of all 2,000, not the first 50
    tiny = SampleCollector(CollectPolicy(policy_id="p", max_rows=10_000, max_bytes=1024), 3, "d", clock)
    assert tiny.capacity == 1024 // (8 * 3 + 16)  # the byte cap binds (values, confidence, label)


@pytest.mark.unit
def test_low_confidence_first_keeps_the_hardest_rows() -> None:
    policy = CollectPolicy(policy_id="hard", strategy="low_confidence", max_rows=5)
    c = SampleCollector(policy, 1, "dev-1", FakeClock())
    conf = np.random.default_rng(0).permutation(np.linspace(0.3, 1.0, 100))
    c.offer(conf.reshape(-1, 1), conf)
    with np.load(io.BytesIO(c.archive()), allow_pickle=False) as z:
        assert sorted(z["confidence"].tolist()) == pytest.approx(sorted(conf)[:5])


@pytest.mark.integration
def test_upload_resumes_and_the_fleet_records_a_checked_version(tmp_path: Path) -> None:
    c = SampleCollector(POLICY, 3, "dev-1", FakeClock())
    c.offer(np.random.default_rng(1).normal(size=(500, 3)))
    archive = c.archive()
    up = ChunkUploader(tmp_path / "collect", POLICY, "dev-1", archive)
    assert up.total > 2
    store = DatasetStore(tmp_path / "datasets.db")
    first = up.pending()[0]
    assert store.ingest_chunk("dev-1", first[1]) == "partial"
    up.ack(first[0])
    assert store.ingest_chunk("dev-1", first[1]) == "duplicate"  # QoS 1 redelivery
    resumed = ChunkUploader(tmp_path / "collect", POLICY, "dev-1")  # e.g. after an agent restart
    assert resumed.next_index == 1 and resumed.sha256 == up.sha256
    results = [store.ingest_chunk("dev-1", payload) for _, payload in resumed.pending()]
    assert results[-1] == "complete" and set(results[:-1]) <= {"partial"}
    (v,) = store.versions("drift-b-1")
    assert v.rows == 50 and v.columns == 3 and v.device_id == "dev-1" and v.sha256 == up.sha256
    assert v.provenance["seen"] == 500 and v.provenance["strategy"] == "reservoir"
    with np.load(io.BytesIO(store.export_npz(v.dataset_id)), allow_pickle=False) as z:
        with np.load(io.BytesIO(archive), allow_pickle=False) as orig:
            assert np.array_equal(z["x"], orig["x"])
    with pytest.raises(NotFound):
        store.export_npz("nope")
    store.close()


@pytest.mark.integration
def test_bad_chunks_are_refused_and_counted(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "datasets.db")
    c = SampleCollector(POLICY, 3, "dev-1", FakeClock())
    c.offer(np.zeros((10, 3)))
    up = ChunkUploader(tmp_path / "u", POLICY, "dev-1", c.archive())
    chunks = [decode_chunk(p) for _, p in up.pending()]
    assert store.ingest_chunk("dev-2", encode_chunk(chunks[0])) == "rejected"  # someone else's name
    assert store.ingest_chunk("dev-1", b"\x00junk") == "rejected"
    forged = [DatasetChunk(x.policy_id, x.device_id, x.upload_id, x.index, x.total, x.sha256,
                           x.data[:-1] + b"!" if x.index == 0 else x.data) for x in chunks]
    results = [store.ingest_chunk("dev-1", encode_chunk(x)) for x in forged]
    assert results[-1] == "rejected" and store.versions() == []  # the digest did not match
    assert store.counters.reasons == {"wrong_device": 1, "malformed": 1, "digest_mismatch": 1}
    mixed = DatasetChunk(chunks[0].policy_id, "dev-1", chunks[0].upload_id, 1, chunks[0].total + 1,
                         chunks[0].sha256, b"x")
    assert store.ingest_chunk("dev-1", encode_chunk(chunks[0])) == "partial"
    assert store.ingest_chunk("dev-1", encode_chunk(mixed)) == "rejected"  # disagrees with its upload
    for bad in ([1, "p", "d", "u", 5, 2, "a" * 64, b"x"], [1, "p", "d", "u", 0, 1, "zz", b"x"], [2]):
        import cbor2  # lazy: only this test builds raw CBOR

        with pytest.raises(MessageError):
            decode_chunk(cbor2.dumps(bad))
    store.close()
