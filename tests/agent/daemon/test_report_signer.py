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
