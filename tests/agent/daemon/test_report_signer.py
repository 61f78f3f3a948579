"""The agent's report signer: its key stays 0600 on the device, counters never repeat across crashes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.contract.report_auth import HEADER, verify_report
from agent.daemon.report_signer import COUNTER_FILE, KEY_FILE, CounterReservation, ReportSigner, ensure_key
from agent.errors import ConfigError

PAYLOAD = b'{"state":"idle"}'


def _counter(props: tuple[tuple[str, str], ...]) -> int:
    (name, value), = props
    assert name == HEADER
    return int(value.split(".")[0])


@pytest.mark.unit
def test_the_key_is_made_once_kept_0600_and_signs_what_the_fleet_verifies(tmp_path: Path) -> None:
    public, made = ensure_key(tmp_path)
    again, made_again = ensure_key(tmp_path)
    assert made and not made_again and public == again and len(public) == 32
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    signer = ReportSigner.load(tmp_path, "dev-1")
    assert signer is not None
    (_, header), = signer.sign("reported", PAYLOAD)
    assert verify_report(public, "reported", "dev-1", PAYLOAD, header, last_counter=0) > 0


@pytest.mark.unit
def test_no_key_means_no_signer(tmp_path: Path) -> None:
    assert ReportSigner.load(tmp_path, "dev-1") is None


@pytest.mark.unit
def test_a_key_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        ensure_key(tmp_path)


@pytest.mark.unit
def test_counters_are_reserved_durably_before_use_and_never_reused_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / COUNTER_FILE
    stopped_clock = lambda: 0.0  # noqa: E731 - a clock set back to 1970 must not matter
    first = CounterReservation(path, block=10, clock=stopped_clock)
    used = [first.take() for _ in range(13)]  # crosses a block: reserved again before the 11th
    assert used == list(range(1, 14))
    assert int(path.read_text()) == 20 >= max(used)  # on disk before any of them was handed out
    # crash: `first` is gone without a word; the next run starts above everything reserved
    second = CounterReservation(path, block=10, clock=stopped_clock)
    assert second.take() == 21
    assert int(path.read_text()) == 30


@pytest.mark.unit
def test_signer_counters_across_a_restart_stay_above_the_old_ones(tmp_path: Path) -> None:
    ensure_key(tmp_path)
    one = ReportSigner.load(tmp_path, "dev-1", clock=lambda: 0.0)
    assert one is not None
    before = [_counter(one.sign("events", PAYLOAD)) for _ in range(3)]
    two = ReportSigner.load(tmp_path, "dev-1", clock=lambda: 0.0)  # restart, clock at the epoch
    assert two is not None
    assert _counter(two.sign("events", PAYLOAD)) > max(before)


@pytest.mark.unit
def test_a_restored_older_counter_file_is_overtaken_by_the_clock(tmp_path: Path) -> None:
    (tmp_path / COUNTER_FILE).write_text("5\n")  # a backup from long ago
    reservation = CounterReservation(tmp_path / COUNTER_FILE, clock=lambda: 1_700_000_000.0)
    assert reservation.take() == 1_700_000_000_000_000


def _pems() -> dict[str, bytes]:
    """An Ed25519 key in the plain RFC 8410 form (what enrollment writes), the same key in an
    OpenSSH container, and an RSA key: the last two are not the plain form, so cryptography
    reads them, and refuses them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = ed25519.Ed25519PrivateKey.generate()
    plain = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    openssh = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    return {"plain": plain, "rsa": other, "openssh": openssh}


@pytest.mark.unit
def test_libsodium_and_cryptography_sign_the_same_bytes_for_a_plain_key(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain key is signed by PyNaCl (1.3 MB of RSS, not cryptography's 8): Ed25519 is
    deterministic, so its signatures are byte for byte cryptography's, which the fleet verifies."""
    import sys

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from agent.daemon.report_signer import signing_function

    pem = _pems()["plain"]
    sign = signing_function(pem)
    assert "nacl.signing" in sys.modules and getattr(sign, "__name__", "") == "<lambda>"  # libsodium
    key = load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    for message in (b"", b"efr1\0reported\0dev\0" + b"x" * 300):
        assert sign(message) == key.sign(message)
    monkeypatch.setitem(sys.modules, "nacl.signing", None)  # PyNaCl missing: cryptography signs
    fallback = signing_function(pem)
    assert fallback(b"m") == sign(b"m") and getattr(fallback, "__name__", "") == "sign"


@pytest.mark.unit
def test_a_key_in_another_form_is_read_by_cryptography_or_refused(tmp_path: Path) -> None:
    from agent.daemon.report_signer import signing_function

    pems = _pems()
    with pytest.raises(ConfigError, match="not Ed25519"):
        signing_function(pems["rsa"])
    with pytest.raises(ConfigError, match="not a PEM private key"):
        signing_function(pems["openssh"])  # another container: never half-parsed by hand
    truncated = pems["plain"].replace(b"\n-----END", b"AAAA\n-----END")
    with pytest.raises(ConfigError):
        signing_function(truncated)  # not the 48-byte form: cryptography gets it, and refuses
    (tmp_path / KEY_FILE).write_bytes(pems["rsa"])
    with pytest.raises(ConfigError):
        ReportSigner.load(tmp_path, "dev-1")
