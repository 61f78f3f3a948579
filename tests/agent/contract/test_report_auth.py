"""Signed device reports (the contract): only the device's own key, for this payload, once."""

from __future__ import annotations

import pytest

from agent.contract.report_auth import new_device_key, sign_report, verify_report
from agent.errors import BadReportSignatureError, ReplayedReportError, UnsignedReportError

PAYLOAD = b'{"schema_version":1,"state":"idle","active_bundle":"mlp-2.0.0","timestamp":1.0}'


def test_a_report_signed_by_its_device_verifies_and_advances_the_counter() -> None:
    private, public = new_device_key()
    header = sign_report(private, "reported", "dev-1", 7, PAYLOAD)
    assert verify_report(public, "reported", "dev-1", PAYLOAD, header, last_counter=6) == 7


def test_another_devices_key_is_refused() -> None:
    _mine, my_public = new_device_key()
    theirs, _ = new_device_key()
    forged = sign_report(theirs, "reported", "dev-1", 7, PAYLOAD)
    with pytest.raises(BadReportSignatureError, match="not signed by that device's key"):
        verify_report(my_public, "reported", "dev-1", PAYLOAD, forged, 0)


def test_signature_cannot_move_to_another_payload_device_or_topic() -> None:
    private, public = new_device_key()
    header = sign_report(private, "events", "dev-1", 3, PAYLOAD)
    with pytest.raises(BadReportSignatureError):
        verify_report(public, "events", "dev-1", PAYLOAD.replace(b"2.0.0", b"9.0.0"), header, 0)
    with pytest.raises(BadReportSignatureError):
        verify_report(public, "events", "dev-2", PAYLOAD, header, 0)
    with pytest.raises(BadReportSignatureError):
        verify_report(public, "reported", "dev-1", PAYLOAD, header, 0)


def test_replayed_report_is_dropped() -> None:
    private, public = new_device_key()
    header = sign_report(private, "telemetry", "dev-1", 5, PAYLOAD)
    last = verify_report(public, "telemetry", "dev-1", PAYLOAD, header, 4)
    with pytest.raises(ReplayedReportError, match="counter 5 is not above 5"):
        verify_report(public, "telemetry", "dev-1", PAYLOAD, header, last)


@pytest.mark.parametrize("header", [None, "", "7", "7.notbase64", "x." + "A" * 86 + "=="])
def test_unsigned_or_malformed_header_is_refused(header: str | None) -> None:
    _, public = new_device_key()
    with pytest.raises(UnsignedReportError):
        verify_report(public, "reported", "dev-1", PAYLOAD, header, 0)
