"""Dataset chunks are signed device reports: only the device's own key, over this chunk, once.

Each attack (another device's key, no signature, a tampered chunk, a replay, a signature made
for another topic kind) is refused by the fleet's report gate with its reason, counted, and
changes nothing: the genuine chunk of the same index is still new afterwards and no dataset
version appears until the genuine upload completes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.contract.protocol import Topics
from agent.transport import Message
from fleet.collection.ingest import DatasetIngest
from fleet.collection.records import CollectionStore, make_policy
from fleet.delivery.report_verify import ReportVerifier, report_families
from fleet.errors import FleetMisuseError
from fleet.registry.datasets import DatasetStore
from fleet.store import Store
from tests.support.datasets import chunks_of, sample_archive
from tests.support.fakes import FakeClock
from tests.support.postgres import Backend
from tests.support.report_signing import DeviceKey

PREFIX = "ef-ds"
Props = tuple[tuple[str, str], ...]


@dataclass
class Rig:
    store: Store
    gate: ReportVerifier
    ingest: DatasetIngest
    a: DeviceKey
    b: DeviceKey
    chunks: list[bytes]  # dev-a's genuine upload under the active policy

    def send(self, payload: bytes, props: Props = (), device: str = "dev-a") -> str | None:
        return self.ingest.receive(Message(Topics(PREFIX).dataset(device), payload, user_properties=props))

    def refused(self, reason: str) -> int:
        return self.gate.refused()[("dataset", reason)]


def _rig(location: Path | str, tmp_path: Path, mode: str = "required") -> Iterator[Rig]:
    store = Store(location)
    clock = FakeClock()
    datasets = DatasetStore(tmp_path / f"telemetry-{mode}.db", clock)
    try:
        for dev in ("dev-a", "dev-b", "dev-old"):
            store.devices.create(dev, {}, {}, dev, "$7$x", "test")
        a, b = DeviceKey("dev-a").register(store), DeviceKey("dev-b").register(store)
        collections = CollectionStore(datasets.database, clock)
        collections.create("m", "1.0.0", "", make_policy("col-1", max_rows=10, max_seconds=60), "ops")
        collections.update("col-1", status="collecting", applied="collecting",
                           devices=["dev-a", "dev-b", "dev-old"], closes_at=clock() + 100)
        gate = ReportVerifier(store.report_keys, PREFIX, mode)  # type: ignore[arg-type]
        ingest = DatasetIngest(datasets, collections, clock, topics=Topics(PREFIX), gate=gate)
        chunks = chunks_of("col-1", "dev-a", sample_archive(device="dev-a"))
        assert len(chunks) >= 4
        yield Rig(store, gate, ingest, a, b, chunks)
    finally:
        datasets.close()
        store.close()


@pytest.fixture
def rig(backend: Backend, tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(backend.location(), tmp_path)


@pytest.fixture
def optional_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path / "fleet-optional.db", tmp_path, mode="optional")


@pytest.mark.integration
def test_attacks_on_dataset_chunks_are_refused_with_their_reason_and_change_nothing(rig: Rig) -> None:
    first, second, *rest = rig.chunks
    datasets = rig.ingest.datasets
    # a neighbour's key (its ACL too wide) uploading on dev-a's topic
    assert rig.send(first, rig.b.props("dataset", first)) == "rejected"
    assert rig.refused("bad_signature") == 1
    # dev-b's key claiming to be dev-a: the signature is over dev-a's id, but not by dev-a's key
    assert rig.send(first, rig.b.props("dataset", first, device_id="dev-a")) == "rejected"
    assert rig.refused("bad_signature") == 2
    # no signature at all
    assert rig.send(first) == "rejected"
    assert rig.refused("unsigned") == 1
    # tampered: dev-a's signature of chunk 0, another chunk's bytes under it
    assert rig.send(second, rig.a.props("dataset", first)) == "rejected"
    # dev-a's signature made for another topic kind (telemetry), moved onto the dataset topic
    assert rig.send(first, rig.a.props("telemetry", first)) == "rejected"
    assert rig.refused("bad_signature") == 4
    # nothing of that reached the store: the genuine chunk 0 is still new
    assert datasets.versions() == [] and datasets.counters.chunks == 0
    genuine = rig.a.props("dataset", first)
    assert rig.send(first, genuine) == "partial"
    assert rig.send(second, rig.a.props("dataset", second)) == "partial"
    # replays: the first chunk's message again (an older counter), the last one again (a duplicate)
    chunks_before = datasets.counters.chunks
    assert rig.send(first, genuine) == "rejected"
    assert rig.refused("replayed") == 1
    last = rig.a.props("dataset", rest[0])
    assert rig.send(rest[0], last) == "partial"
    assert rig.send(rest[0], last) == "rejected"
    assert rig.refused("duplicate") == 1
    assert datasets.counters.chunks == chunks_before + 1 and datasets.counters.duplicates == 0
    assert datasets.counters.reasons == {"report_auth": 7}
    # a resend with a fresh counter (an agent after a restart) passes the gate; the store drops it
    assert rig.send(first, rig.a.props("dataset", first)) == "duplicate"
    results = [rig.send(c, rig.a.props("dataset", c)) for c in rest[1:]]
    assert results[-1] == "complete"
    assert [(v.device_id, v.rows) for v in datasets.versions("col-1")] == [("dev-a", 5)]
    assert rig.store.report_keys.last_counters("dev-a")["dataset"] > 0


@pytest.mark.integration
def test_a_keyless_devices_unsigned_chunks_pass_only_in_optional_mode(rig: Rig, optional_rig: Rig) -> None:
    old = chunks_of("col-1", "dev-old", sample_archive(device="dev-old"))
    assert rig.send(old[0], device="dev-old") == "rejected"  # required: refused, unsigned
    assert rig.refused("unsigned") == 1 and rig.gate.accepted_unsigned()["dataset"] == 0
    key = DeviceKey("dev-old")  # signed, but not with a registered key
    assert optional_rig.send(old[0], key.props("dataset", old[0]), device="dev-old") == "rejected"
    assert optional_rig.refused("unknown_key") == 1
    assert optional_rig.send(old[0], device="dev-old") == "partial"  # optional: let on, counted
    assert optional_rig.gate.accepted_unsigned()["dataset"] == 1
    assert optional_rig.send(optional_rig.chunks[0]) == "rejected"  # a keyed device: held to its key
    assert optional_rig.refused("unsigned") == 1


@pytest.mark.integration
def test_refused_chunks_are_in_the_report_metric_and_a_subscribing_ingest_needs_the_gate(
        rig: Rig, tmp_path: Path) -> None:
    rig.send(rig.chunks[0])
    refused = next(report_families(rig.gate))
    samples = {(s.labels["kind"], s.labels["reason"]): s.value for s in refused.samples}
    assert samples[("dataset", "unsigned")] == 1 and samples[("dataset", "replayed")] == 0
    with pytest.raises(FleetMisuseError, match="gate"):
        DatasetIngest(rig.ingest.datasets, rig.ingest.collections, transport=object(),  # type: ignore[arg-type]
                      topics=Topics(PREFIX))
