"""The daemon's collection runner: a sample only under a signed policy, capped, uploaded in
chunks on the device's own topic, resumed after a restart at the first unacknowledged chunk."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner, Signer

from agent.contract.collect import CollectPolicy, decode_chunk
from agent.contract.director import DirectorDocument, DirectorTrust, TargetRef, sign_director
from agent.contract.protocol import Topics
from agent.contract.report_auth import HEADER, verify_report
from agent.daemon.collection import CollectionRunner
from agent.daemon.report_signer import ReportSigner, ensure_key
from agent.errors import TransportError
from tests.support.fakes import FakeClock

REF = TargetRef(path="models/m/m-1.0.0.efb", length=1234, sha256="a" * 64, name="m", version="1.0.0")
POLICY = CollectPolicy(policy_id="col-1", max_rows=30, max_seconds=10, chunk_bytes=1024, seed=1)


class _Done:
    def is_published(self) -> bool:
        return True


class _Lost:
    def is_published(self) -> bool:
        return False


class FakeTransport:
    """Takes `budget` messages, then refuses (a broker gone mid-upload); `lose_last`: the last
    one it takes is sent but never acknowledged (the connection drops before the PUBACK)."""

    def __init__(self, budget: int = 10_000, lose_last: bool = False) -> None:
        self.budget, self.lose_last = budget, lose_last
        self.sent: list[tuple[str, bytes]] = []
        self.props: list[tuple[tuple[str, str], ...]] = []
        self.connected = True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                user_properties: tuple[tuple[str, str], ...] = ()) -> _Done | _Lost:
        if len(self.sent) >= self.budget:
            raise TransportError("broker gone")
        self.sent.append((topic, payload))
        self.props.append(user_properties)
        if self.lose_last and len(self.sent) == self.budget:
            self.connected = False
            return _Lost()
        return _Done()


@pytest.fixture(scope="module")
def signer() -> Signer:
    return CryptoSigner.generate_ed25519()


def _doc(signer: Signer, seq: int, collect: CollectPolicy | None = POLICY) -> bytes:
    now = datetime.now(UTC).replace(microsecond=0)
    doc = DirectorDocument(device_id="dev-1", cohort=None, sequence=seq, issued_at=now,
                           expires=now + timedelta(days=1), target=REF, collect=collect)
    return sign_director(doc, [signer])


def _runner(tmp: Path, signer: Signer, transport: FakeTransport, clock: FakeClock,
            reports: ReportSigner | None = None) -> CollectionRunner:
    trust = DirectorTrust(keys={signer.public_key.keyid: signer.public_key}, threshold=1)
    return CollectionRunner(tmp, "dev-1", [], lambda: trust, transport, Topics("ef", "dev-1"),  # type: ignore[arg-type]
                            clock=clock, signer=reports)


def _serve(r: CollectionRunner, n: int, bundle: str = "m-1.0.0") -> None:
    rng = np.random.default_rng(0)
    for _ in range(n):
        r.offer(bundle, rng.standard_normal((4, 8)), rng.random((4, 3)))


@pytest.mark.integration
def test_nothing_is_collected_without_a_signed_policy(tmp_path: Path, signer: Signer) -> None:
    t, clock = FakeTransport(), FakeClock()
    r = _runner(tmp_path, signer, t, clock)
    _serve(r, 5)  # no document yet
    r.on_document(_doc(signer, 1, collect=None), 0)  # a document without a policy
    _serve(r, 5)
    forged = json.loads(_doc(CryptoSigner.generate_ed25519(), 2))  # signed by a key we do not trust
    r.on_document(json.dumps(forged).encode(), 1)
    tampered = json.loads(_doc(signer, 3))
    tampered["signed"]["collect"]["max_rows"] = 100_000
    r.on_document(json.dumps(tampered).encode(), 2)
    _serve(r, 5)
    clock.advance(100)
    r.tick()
    assert r.state is None and t.sent == [] and not (tmp_path / "collect").exists()


@pytest.mark.integration
def test_a_capped_sample_goes_up_in_chunks_and_resumes_after_restart(tmp_path: Path, signer: Signer) -> None:
    t, clock = FakeTransport(budget=2), FakeClock()
    r = _runner(tmp_path, signer, t, clock)
    r.on_document(_doc(signer, 1), 0)
    _serve(r, 20, bundle="other-2.0.0")  # rows of another bundle are not this policy's
    _serve(r, 20)  # 80 rows of the named bundle: at most 30 kept
    r.tick()
    assert t.sent == []  # still collecting
    clock.advance(11)
    _serve(r, 5)  # after max_seconds: not taken
    r.tick()  # closes the sample; two chunks go, then the broker is gone
    assert r.phase == "uploading" and len(t.sent) == 2
    assert {topic for topic, _ in t.sent} == {"ef/v1/devices/dev-1/dataset"}
    # restart: a new runner over the same state directory resumes at chunk 2
    t2 = FakeTransport()
    r2 = _runner(tmp_path, signer, t2, clock)
    assert r2.phase == "uploading"
    r2.tick()
    chunks = [decode_chunk(p) for _, p in t.sent + t2.sent]
    assert [c.index for c in chunks] == list(range(chunks[0].total))  # every chunk once, in order
    assert r2.phase == "done"
    data = b"".join(c.data for c in chunks)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        assert z["x"].shape == (30, 8)
        meta = json.loads(bytes(z["meta"]))
    assert meta["seen"] == 80 and meta["kept"] == 30
    r2.tick()
    assert len(t2.sent) == len(chunks) - 2  # done: nothing sent again


@pytest.mark.integration
def test_a_document_without_the_policy_withdraws_it(tmp_path: Path, signer: Signer) -> None:
    t, clock = FakeTransport(), FakeClock()
    r = _runner(tmp_path, signer, t, clock)
    r.on_document(_doc(signer, 1), 0)
    _serve(r, 3)
    r.on_document(_doc(signer, 2), 1)  # the same policy re-signed: carries on
    assert r.phase == "collecting"
    r.on_document(_doc(signer, 3, collect=None), 2)
    assert r.phase == "withdrawn"
    clock.advance(100)
    r.tick()
    assert t.sent == []


@pytest.mark.integration
def test_every_chunk_send_is_signed_afresh_even_a_resend_after_restart(tmp_path: Path,
                                                                       signer: Signer) -> None:
    public, _ = ensure_key(tmp_path)
    t, clock = FakeTransport(budget=2, lose_last=True), FakeClock()
    r = _runner(tmp_path, signer, t, clock, ReportSigner.load(tmp_path, "dev-1"))
    r.on_document(_doc(signer, 1), 0)
    _serve(r, 20)
    clock.advance(11)
    r.tick()  # chunk 0 acknowledged; chunk 1 sent, its PUBACK lost with the connection
    assert r.phase == "uploading" and len(t.sent) == 2
    t2 = FakeTransport()  # restart: a new signer over the same state directory (counters on disk)
    r2 = _runner(tmp_path, signer, t2, clock, ReportSigner.load(tmp_path, "dev-1"))
    r2.tick()
    assert r2.phase == "done"
    assert decode_chunk(t2.sent[0][1]).index == 1  # chunk 1 again: the broker never acked it
    counters = []
    for (_, payload), props in zip(t.sent + t2.sent, t.props + t2.props, strict=True):
        (name, header), = props
        assert name == HEADER
        counters.append(verify_report(public, "dataset", "dev-1", payload, header, last_counter=0))
    assert counters == sorted(set(counters))  # strictly increasing: the resend is no replay
    assert t.sent[1][1] == t2.sent[0][1] and t.props[1] != t2.props[0]


@pytest.mark.integration
def test_a_device_without_a_report_key_sends_unsigned_chunks(tmp_path: Path, signer: Signer) -> None:
    t, clock = FakeTransport(), FakeClock()
    r = _runner(tmp_path, signer, t, clock)
    r.on_document(_doc(signer, 1), 0)
    _serve(r, 5)
    clock.advance(11)
    r.tick()
    assert t.sent and all(p == () for p in t.props)  # a strict fleet refuses these (unsigned)
