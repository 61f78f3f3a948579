"""Dataset versions keep the labels devices attached: the export has a `labels` column (NaN for
unknown), the version counts its labelled rows itself, an archive from an agent before labels
still ingests (exported with every label unknown), and a malformed `labels` column is refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from agent.contract.collect import CollectPolicy
from agent.telemetry.collect import ChunkUploader, SampleCollector
from fleet.registry.datasets import DatasetStore
from tests.support.fakes import FakeClock

POLICY = CollectPolicy(policy_id="lab-1", max_rows=20, chunk_bytes=1024, seed=3)


def _upload(tmp: Path, store: DatasetStore, archive: bytes, device: str = "dev-1") -> str:
    up = ChunkUploader(tmp / f"up-{device}-{len(archive)}", POLICY, device, archive)
    results = [store.ingest_chunk(device, payload) for _, payload in up.pending()]
    return results[-1]


def _old_archive(x: np.ndarray) -> bytes:
    """What an agent before labels uploaded: `x`, `confidence`, `meta` and no `labels`."""
    meta = {"policy_id": POLICY.policy_id, "strategy": "reservoir", "device_id": "dev-1", "seen": len(x),
            "kept": len(x), "started": 0.0, "ended": 1.0}
    buf = io.BytesIO()
    np.savez(buf, x=x, confidence=np.full(len(x), np.nan),
             meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return buf.getvalue()


def _export(store: DatasetStore) -> dict[str, np.ndarray]:
    (v,) = store.versions(POLICY.policy_id)
    with np.load(io.BytesIO(store.export_npz(v.dataset_id)), allow_pickle=False) as z:
        return {k: np.asarray(z[k]) for k in z.files}


@pytest.mark.integration
def test_labels_collected_on_the_device_are_in_the_export_and_counted(tmp_path: Path) -> None:
    c = SampleCollector(POLICY, 3, "dev-1", FakeClock())
    x = np.random.default_rng(0).normal(size=(12, 3))
    ids = [f"e-{n}" for n in range(12)]
    c.offer(x, None, ids)
    c.label(ids[:4], [0.0, 1.0, 2.0, 1.0])
    store = DatasetStore(tmp_path / "d.db")
    assert _upload(tmp_path, store, c.archive()) == "complete"
    (v,) = store.versions(POLICY.policy_id)
    assert v.labelled == 4 and v.provenance["labelled"] == 4 and v.rows == 12
    z = _export(store)
    np.testing.assert_array_equal(z["labels"][:4], [0.0, 1.0, 2.0, 1.0])
    assert np.isnan(z["labels"][4:]).all() and set(z) == {"x", "confidence", "labels", "meta"}
    store.close()


@pytest.mark.integration
def test_an_archive_from_before_labels_still_ingests(tmp_path: Path) -> None:
    x = np.arange(15.0).reshape(5, 3)
    store = DatasetStore(tmp_path / "d.db")
    assert _upload(tmp_path, store, _old_archive(x)) == "complete"
    (v,) = store.versions(POLICY.policy_id)
    assert v.labelled == 0 and v.rows == 5
    z = _export(store)
    np.testing.assert_array_equal(z["x"], x)
    assert z["labels"].shape == (5,) and np.isnan(z["labels"]).all()
    store.close()


@pytest.mark.integration
@pytest.mark.parametrize("labels", [np.zeros(4), np.zeros((5, 1)), np.array(["a"] * 5),
                                    np.array([1.0, np.inf, 0.0, 0.0, 0.0])])
def test_a_malformed_labels_column_refuses_the_archive(tmp_path: Path, labels: np.ndarray) -> None:
    buf = io.BytesIO()
    meta = {"kept": 5, "labelled": 5}
    np.savez(buf, x=np.zeros((5, 3)), labels=labels, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    store = DatasetStore(tmp_path / "d.db")
    assert _upload(tmp_path, store, buf.getvalue()) == "rejected"
    assert store.counters.reasons == {"bad_archive": 1} and store.versions() == []
    store.close()


@pytest.mark.integration
def test_the_labelled_count_is_the_fleets_own_not_the_devices_claim(tmp_path: Path) -> None:
    buf = io.BytesIO()
    meta = {"kept": 3, "labelled": 3}  # the device claims 3; one row has a label
    np.savez(buf, x=np.zeros((3, 2)), labels=np.array([1.0, np.nan, np.nan]),
             meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    store = DatasetStore(tmp_path / "d.db")
    assert _upload(tmp_path, store, buf.getvalue()) == "complete"
    assert store.versions()[0].labelled == 1
    store.close()
