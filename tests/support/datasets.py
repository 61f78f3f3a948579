"""A collected dataset version made the way devices make one (for tests that need one to exist)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from agent.contract.collect import DatasetChunk, encode_chunk
from fleet.collection.ingest import DatasetIngest
from fleet.collection.records import CollectionStore
from fleet.registry.datasets import DatasetStore


def sample_archive(rows: int = 5, width: int = 3, device: str = "dev-1") -> bytes:
    buf = io.BytesIO()
    text = f'{{"device_id": "{device}", "seen": {rows * 2}, "kept": {rows}}}'
    meta = np.frombuffer(text.encode(), np.uint8)
    np.savez(buf, x=np.ones((rows, width)), confidence=np.full(rows, 0.5), meta=meta)
    return buf.getvalue()


def chunks_of(policy_id: str, device: str, data: bytes, size: int = 256) -> list[bytes]:
    digest = hashlib.sha256(data).hexdigest()
    parts = [data[i:i + size] for i in range(0, len(data), size)]
    return [encode_chunk(DatasetChunk(policy_id, device, digest[:16], i, len(parts), digest, p))
            for i, p in enumerate(parts)]


def seed_dataset(location: str | Path, collection_id: str, device: str = "dev-seed") -> str:
    """Mark the stored collection as collecting from `device`, ingest one sample; its dataset id."""
    datasets = DatasetStore(location)
    try:
        collections = CollectionStore(datasets.database, lambda: 0.0)
        collections.update(collection_id, status="collecting", applied="collecting", devices=[device],
                           closes_at=1e12)
        ingest = DatasetIngest(datasets, collections)
        results = [ingest.admit(device, c) for c in chunks_of(collection_id, device, sample_archive())]
        assert results[-1] == "complete", results
        return datasets.versions(collection_id)[-1].dataset_id
    finally:
        datasets.close()
