"""Collection requests and the dataset door: chunks only under an active policy for the device."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from agent.contract.collect import CollectPolicy, DatasetChunk, encode_chunk
from fleet.collection.decisions import admits_chunks, documents_for, next_status
from fleet.collection.ingest import DatasetIngest
from fleet.collection.records import CollectionStore, make_policy
from fleet.errors import Conflict, FleetInputError, NotFound
from fleet.registry.datasets import DatasetStore
from tests.support.fakes import FakeClock


def _archive(rows: int = 5, width: int = 3) -> bytes:
    buf = io.BytesIO()
    meta = np.frombuffer(b'{"device_id": "dev-1", "seen": 9, "kept": 5}', dtype=np.uint8)
    np.savez(buf, x=np.ones((rows, width)), confidence=np.full(rows, 0.5), meta=meta)
    return buf.getvalue()


def _chunks(policy: CollectPolicy, device: str, data: bytes, size: int = 256) -> list[bytes]:
    digest = hashlib.sha256(data).hexdigest()
    parts = [data[i:i + size] for i in range(0, len(data), size)]
    return [encode_chunk(DatasetChunk(policy.policy_id, device, digest[:16], i, len(parts), digest, p))
            for i, p in enumerate(parts)]


World = tuple[DatasetIngest, CollectionStore, FakeClock]


@pytest.fixture
def world(tmp_path: Path) -> World:
    clock = FakeClock()
    datasets = DatasetStore(tmp_path / "telemetry.db", clock)
    collections = CollectionStore(datasets.database, clock)
    return DatasetIngest(datasets, collections, clock), collections, clock


def _collecting(collections: CollectionStore, clock: FakeClock, devices: list[str]) -> CollectPolicy:
    policy = make_policy("col-1", max_rows=10, max_seconds=60, chunk_bytes=1024)
    collections.create("m", "1.0.0", "site=lab", policy, "ops")
    collections.update("col-1", status="collecting", applied="collecting", devices=devices,
                       closes_at=clock() + 100)
    return policy


@pytest.mark.integration
def test_chunks_under_an_active_policy_become_one_dataset_version(world: World) -> None:
    ingest, collections, clock = world
    policy = _collecting(collections, clock, ["dev-1"])
    chunks = _chunks(policy, "dev-1", _archive())
    assert len(chunks) > 1
    results = [ingest.admit("dev-1", c) for c in chunks]
    assert results[-1] == "complete" and set(results[:-1]) == {"partial"}
    assert ingest.admit("dev-1", chunks[0]) != "complete"  # a redelivery never makes a second version
    versions = ingest.datasets.versions("col-1")
    assert [(v.device_id, v.rows, v.columns) for v in versions] == [("dev-1", 5, 3)]
    assert versions[0].provenance["policy_id"] == "col-1"


@pytest.mark.integration
def test_chunks_without_a_policy_for_that_device_are_refused_and_counted(
        world: World) -> None:
    ingest, collections, clock = world
    policy = _collecting(collections, clock, ["dev-1"])
    data = _archive()
    # another device (not among the policy's): refused even on its own topic
    assert ingest.admit("dev-2", _chunks(policy, "dev-2", data)[0]) == "rejected"
    # dev-1's chunk on dev-2's topic: refused
    assert ingest.admit("dev-2", _chunks(policy, "dev-1", data)[0]) == "rejected"
    # a policy id nobody created
    other = CollectPolicy(policy_id="col-nope")
    assert ingest.admit("dev-1", _chunks(other, "dev-1", data)[0]) == "rejected"
    # malformed
    assert ingest.admit("dev-1", b"\x00 not cbor") == "rejected"
    # duplicate
    first = _chunks(policy, "dev-1", data)[0]
    assert ingest.admit("dev-1", first) == "partial"
    assert ingest.admit("dev-1", first) == "duplicate"
    # after the collection closed (time up), or was stopped: refused
    clock.advance(101)
    assert ingest.admit("dev-1", _chunks(policy, "dev-1", data)[1]) == "rejected"
    reasons = ingest.counters["reasons"]
    assert reasons == {"no_policy": 4, "malformed": 1}, reasons
    assert ingest.counters["duplicates"] == 1
    assert ingest.datasets.versions() == []


@pytest.mark.integration
def test_collection_records_refuse_bad_input(world: World) -> None:
    _, collections, clock = world
    with pytest.raises(FleetInputError, match="max_rows"):
        make_policy("col-2", max_rows=0)
    _collecting(collections, clock, ["dev-1"])
    with pytest.raises(Conflict):
        collections.create("m", "1.0.0", "", make_policy("col-1"), "ops")
    with pytest.raises(NotFound):
        collections.get("col-none")
    assert collections.stop("col-1").status == "stopped"
    assert collections.stop("col-1").status == "stopped"  # idempotent


@pytest.mark.integration
def test_only_while_drift_is_the_fleets_decision(world: World) -> None:
    _, collections, clock = world
    policy = make_policy("col-d", only_while_drift=True, max_seconds=60)
    gated = collections.create("m", "1", "", policy, "ops")
    assert next_status(gated, clock(), drift_open=False) == "waiting_for_drift"
    assert next_status(gated, clock(), drift_open=True) == "collecting"
    on = collections.update("col-d", status="collecting", closes_at=clock() + 10, devices=["d"])
    assert next_status(on, clock(), drift_open=True) == "collecting"
    assert next_status(on, clock(), drift_open=False) == "waiting_for_drift"  # episode ended: withdraw
    assert documents_for("waiting_for_drift", previously_carried=True) is False
    assert documents_for("waiting_for_drift", previously_carried=False) is None
    assert next_status(on, clock() + 10, drift_open=True) == "closed"
    assert admits_chunks(on, "d", clock()) and not admits_chunks(on, "x", clock())
    plain = collections.create("m", "1", "", make_policy("col-p"), "ops")
    assert next_status(plain, clock(), drift_open=False) == "collecting"
