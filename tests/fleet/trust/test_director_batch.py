"""`DirectorSigner.issue_many`: one sequence transaction for a batch, each document verifiable by
its own device only, sequences continuing those issued one at a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.contract.director import DirectorError, DirectorTrust, TargetRef, verify_director
from fleet.errors import FleetInputError
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository

TARGET = TargetRef(path="models/m/m-2.efb", length=10, sha256="ab" * 32, name="m", version="2")


@pytest.mark.integration
def test_a_batch_signs_each_device_its_own_next_document(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    Repository(tmp_path / "repo", keys).init(root_threshold=1, root_keys=1)
    signer = DirectorSigner(keys, tmp_path / "director")
    signer.issue(TARGET, device_id="d1")  # d1 is at 1 already
    docs = signer.issue_many(TARGET, ["d1", "d2", "d3"], rollout_id="r1", reason="stage 0")
    trust = DirectorTrust(keys={s.public_key.keyid: s.public_key for s in keys.signers("director")})
    now = datetime.now(UTC)
    pairs = zip(docs, ["d1", "d2", "d3"], strict=True)
    seqs = [verify_director(doc, trust, dev, [], 0, now).sequence for doc, dev in pairs]
    assert seqs == [2, 1, 1]
    assert [signer.last_sequence(device_id=d) for d in ("d1", "d2", "d3")] == [2, 1, 1]
    with pytest.raises(DirectorError, match="addressed to device"):
        verify_director(docs[1], trust, "d1", [], 0, now)  # d2's document is no good to d1
    with pytest.raises(DirectorError, match="replayed or stale"):
        verify_director(docs[0], trust, "d1", [], 2, now)
    assert signer.issue_many(TARGET, []) == []
    with pytest.raises(FleetInputError):
        signer.issue_many(TARGET, ["d1"], ttl=timedelta(0))
    assert signer.last_sequence(device_id="d1") == 2  # a refused batch reserves nothing
    signer.close()
