"""Director documents: each attack is refused with a specific `DirectorError`."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner, Signer

from agent.contract.director import (
    MAX_DIRECTOR_BYTES,
    ROOT_DIRECTOR_FIELD,
    DirectorDocument,
    DirectorTrust,
    TargetRef,
    sign_director,
    verify_director,
)
from agent.contract.windows import UpdateWindows, Window
from agent.errors import DirectorError, UnknownDirectorKeyError
from fleet.errors import FleetInputError
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from tests.support.postgres import Backend

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
REF = TargetRef(path="models/m/m-1.0.0.efb", length=1234, sha256="a" * 64, name="m", version="1.0.0")


def _trust(signers: list[Signer], threshold: int = 1) -> DirectorTrust:
    return DirectorTrust(keys={s.public_key.keyid: s.public_key for s in signers}, threshold=threshold)


def _doc(**over: object) -> DirectorDocument:
    fields: dict[str, object] = {
        "device_id": "dev-1",
        "sequence": 5,
        "issued_at": NOW - timedelta(hours=1),
        "expires": NOW + timedelta(days=1),
        "target": REF,
    }
    fields.update(over)
    return DirectorDocument.model_validate(fields)


@pytest.fixture(scope="module")
def keys() -> list[Signer]:
    return [CryptoSigner.generate_ed25519() for _ in range(3)]


@pytest.mark.unit
def test_valid_document_round_trips(keys: list[Signer]) -> None:
    data = sign_director(_doc(shadow=REF, rollout_id="r1", reason="canary"), keys[:1])
    doc = verify_director(data, _trust(keys[:1]), "dev-1", [], last_sequence=4, now=NOW)
    assert doc.target == REF and doc.shadow == REF and doc.sequence == 5 and doc.rollout_id == "r1"


@pytest.mark.unit
def test_cohort_document_accepted_by_member(keys: list[Signer]) -> None:
    data = sign_director(_doc(device_id=None, cohort="canary"), keys[:1])
    assert verify_director(data, _trust(keys[:1]), "dev-9", ["eu", "canary"], 0, NOW).cohort == "canary"


@pytest.mark.unit
def test_replayed_older_document_refused(keys: list[Signer]) -> None:
    data = sign_director(_doc(sequence=5), keys[:1])
    with pytest.raises(
        DirectorError, match="replayed or stale: sequence 5 is not greater than the last accepted"
    ):
        verify_director(data, _trust(keys[:1]), "dev-1", [], last_sequence=5, now=NOW)


@pytest.mark.unit
def test_document_for_another_device_refused(keys: list[Signer]) -> None:
    data = sign_director(_doc(device_id="dev-2"), keys[:1])
    with pytest.raises(DirectorError, match="addressed to device 'dev-2', not 'dev-1'"):
        verify_director(data, _trust(keys[:1]), "dev-1", [], 0, NOW)


@pytest.mark.unit
def test_document_for_another_cohort_refused(keys: list[Signer]) -> None:
    data = sign_director(_doc(device_id=None, cohort="beta"), keys[:1])
    with pytest.raises(DirectorError, match="addressed to cohort 'beta'"):
        verify_director(data, _trust(keys[:1]), "dev-1", ["canary"], 0, NOW)


@pytest.mark.unit
def test_expired_document_refused(keys: list[Signer]) -> None:
    data = sign_director(_doc(expires=NOW - timedelta(seconds=1)), keys[:1])
    with pytest.raises(DirectorError, match="expired at"):
        verify_director(data, _trust(keys[:1]), "dev-1", [], 0, NOW)


@pytest.mark.unit
def test_modified_document_refused(keys: list[Signer]) -> None:
    envelope = json.loads(sign_director(_doc(), keys[:1]))
    envelope["signed"]["target"]["path"] = "models/evil/evil-6.6.6.efb"
    with pytest.raises(DirectorError, match=r"bad director signature .* modified"):
        verify_director(json.dumps(envelope).encode(), _trust(keys[:1]), "dev-1", [], 0, NOW)


@pytest.mark.unit
def test_signature_by_unknown_key_refused(keys: list[Signer]) -> None:
    data = sign_director(_doc(), [CryptoSigner.generate_ed25519()])
    with pytest.raises(DirectorError, match="signed only by unknown key") as err:
        verify_director(data, _trust(keys[:1]), "dev-1", [], 0, NOW)
    assert err.type is UnknownDirectorKeyError  # the daemon defers exactly these (rotated keys)


@pytest.mark.unit
def test_below_threshold_refused(keys: list[Signer]) -> None:
    data = sign_director(_doc(), keys[:1])
    with pytest.raises(DirectorError, match=r"1 valid signature\(s\), below the threshold 2"):
        verify_director(data, _trust(keys, threshold=2), "dev-1", [], 0, NOW)
    # duplicate signatures by one key count once
    envelope = json.loads(data)
    envelope["signatures"] *= 2
    with pytest.raises(DirectorError, match="below the threshold 2"):
        verify_director(json.dumps(envelope).encode(), _trust(keys, threshold=2), "dev-1", [], 0, NOW)
    both = sign_director(_doc(), keys[:2])
    assert verify_director(both, _trust(keys, 2), "dev-1", [], 0, NOW).sequence == 5


@pytest.mark.unit
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "exactly 'signed' and 'signatures'"),
        (b'{"signed": [], "signatures": []}', "'signed' must be an object"),
        (b'{"signed": {"sequence": 1}, "signatures": []}', "invalid director document: issued_at: required"),
        (b" " * (MAX_DIRECTOR_BYTES + 1), "over the 65536 limit"),
    ],
)
def test_malformed_input_refused(keys: list[Signer], data: bytes, message: str) -> None:
    with pytest.raises(DirectorError, match=message):
        verify_director(data, _trust(keys[:1]), "dev-1", [], 0, NOW)


@pytest.mark.unit
def test_schema_rules() -> None:
    with pytest.raises(ValueError, match="exactly one of device_id or cohort"):
        _doc(cohort="x")
    with pytest.raises(ValueError, match="sha256"):
        TargetRef(path="a.efb", length=1, sha256="XYZ")
    with pytest.raises(ValueError, match="relative"):
        TargetRef(path="../etc/passwd", length=1, sha256="a" * 64)
    with pytest.raises(ValueError, match="timezone"):
        _doc(expires=datetime(2030, 1, 1))


@pytest.mark.unit
def test_trust_anchor_parsing(keys: list[Signer]) -> None:
    trust = _trust(keys, threshold=2)
    assert DirectorTrust.from_dict(json.loads(json.dumps(trust.to_dict()))) == trust
    with pytest.raises(DirectorError, match=r"threshold 4 is not within 1..3"):
        DirectorTrust.from_dict({**trust.to_dict(), "threshold": 4})
    with pytest.raises(DirectorError, match="malformed"):
        DirectorTrust.from_dict({"keys": 3})
    assert ROOT_DIRECTOR_FIELD.startswith("x-")


def _database(backend: Backend) -> str | None:
    """The director's database: None (its own SQLite file in the state dir) or the PG URL."""
    return backend.pg_url


@pytest.mark.integration
def test_signer_sequence_persists_and_increases(tmp_path: Path, backend: Backend) -> None:
    store = KeyStore(tmp_path / "keys")
    store.init(root_keys=1, root_threshold=1)
    trust = DirectorTrust(keys={k.keyid: k.public for k in store.role("director").keys}, threshold=1)
    signer = DirectorSigner(store, tmp_path / "state", clock=lambda: NOW, database=_database(backend))
    first = verify_director(signer.issue(REF, device_id="dev-1"), trust, "dev-1", [], 0, NOW)
    second = verify_director(signer.issue(REF, device_id="dev-1"), trust, "dev-1", [], first.sequence, NOW)
    other = verify_director(signer.issue(REF, cohort="canary"), trust, "dev-1", ["canary"], 0, NOW)
    assert (first.sequence, second.sequence, other.sequence) == (1, 2, 1)
    signer.close()
    restarted = DirectorSigner(store, tmp_path / "state", clock=lambda: NOW, database=_database(backend))
    assert restarted.last_sequence(device_id="dev-1") == 2
    third = verify_director(restarted.issue(REF, device_id="dev-1"), trust, "dev-1", [], 2, NOW)
    assert third.sequence == 3 and third.expires == NOW + timedelta(days=7)
    with pytest.raises(FleetInputError, match="exactly one"):
        restarted.issue(REF)
    with pytest.raises(FleetInputError, match="ttl"):
        restarted.issue(REF, device_id="dev-1", ttl=timedelta(0))


@pytest.mark.integration
def test_signer_picks_up_a_rotated_director_key_and_shares_sequences(
        tmp_path: Path, backend: Backend) -> None:
    """The signer caches its keys; a rotation (the key file replaced) must take effect at once."""
    store = KeyStore(tmp_path / "keys")
    store.init(root_keys=1, root_threshold=1)

    def trust() -> DirectorTrust:
        return DirectorTrust(keys={k.keyid: k.public for k in store.role("director").keys}, threshold=1)

    old_trust = trust()
    signer = DirectorSigner(store, tmp_path / "state", clock=lambda: NOW, database=_database(backend))
    verify_director(signer.issue(REF, device_id="dev-1"), old_trust, "dev-1", [], 0, NOW)
    store.rotate("director")
    doc = signer.issue(REF, device_id="dev-1")
    assert verify_director(doc, trust(), "dev-1", [], 1, NOW).sequence == 2
    with pytest.raises(DirectorError):
        verify_director(doc, old_trust, "dev-1", [], 1, NOW)
    # a second signer on the same state (another fleet worker) never reuses a sequence
    other = DirectorSigner(store, tmp_path / "state", clock=lambda: NOW, database=_database(backend))
    assert verify_director(other.issue(REF, device_id="dev-1"), trust(), "dev-1", [], 2, NOW).sequence == 3
    assert signer.last_sequence(device_id="dev-1") == 3
    signer.close()
    other.close()


@pytest.mark.unit
def test_windows_are_signed_with_the_document_and_a_widened_window_is_refused(keys: list[Signer]) -> None:
    windows = UpdateWindows(activation=Window(cron="0 2 * * *", duration_s=7200), tz="Europe/Berlin")
    data = sign_director(_doc(windows=windows), keys[:1])
    assert verify_director(data, _trust(keys[:1]), "dev-1", [], 4, NOW).windows == windows
    envelope = json.loads(data)
    envelope["signed"]["windows"]["activation"]["cron"] = "* * * * *"  # "any time", said by no one
    with pytest.raises(DirectorError, match=r"bad director signature .* modified"):
        verify_director(json.dumps(envelope).encode(), _trust(keys[:1]), "dev-1", [], 4, NOW)
    envelope["signed"]["windows"]["activation"]["cron"] = "0 2 * * * *"  # six fields
    with pytest.raises(DirectorError, match="malformed cron expression"):
        verify_director(json.dumps(envelope).encode(), _trust(keys[:1]), "dev-1", [], 4, NOW)


ALLOCATE = """
import sys
from pathlib import Path
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
root, database = Path(sys.argv[1]), sys.argv[2] or None
signer = DirectorSigner(KeyStore(root / "keys"), root / "state", database=database)
print(" ".join(str(signer._next_sequence("cohort:all")) for _ in range(40)))
"""


@pytest.mark.integration
def test_several_processes_never_get_the_same_sequence(tmp_path: Path, backend: Backend) -> None:
    """Four fleet processes allocating for one addressee at once: every number exactly once."""
    KeyStore(tmp_path / "keys").init(root_keys=1, root_threshold=1)
    procs = [subprocess.Popen([sys.executable, "-c", ALLOCATE, str(tmp_path), _database(backend) or ""],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    got = [int(n) for p in procs for n in p.communicate(timeout=120)[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(got) == list(range(1, 161))
