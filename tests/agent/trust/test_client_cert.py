"""The device refuses a certificate that is not for its key, its id or from the CA sent with it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.errors import UntrustedDataError
from agent.trust.client_cert import check_issued, is_pem_certificates, new_key_and_csr
from agent.trust.identity_check import identity_warnings
from fleet.trust.device_ca import DeviceCA, parse_csr

pytestmark = pytest.mark.unit


def test_the_issued_certificate_is_checked_before_it_is_kept(tmp_path: Path) -> None:
    ca = DeviceCA.create(tmp_path / "ca")
    ours = new_key_and_csr()
    assert serialization.load_pem_private_key(ours.key_pem, password=None)
    good = ca.issue(parse_csr(ours.csr_pem), "dev-1", 3600)
    assert check_issued(good.pem, ca.cert_pem, ours, "dev-1").serial_number == int(good.serial, 16)
    with pytest.raises(UntrustedDataError, match="names \\['dev-1'\\], not the assigned id 'dev-2'"):
        check_issued(good.pem, ca.cert_pem, ours, "dev-2")
    someone_else = ca.issue(parse_csr(new_key_and_csr().csr_pem), "dev-1", 3600)
    with pytest.raises(UntrustedDataError, match="not for this device's key"):
        check_issued(someone_else.pem, ca.cert_pem, ours, "dev-1")
    other_ca = DeviceCA.create(tmp_path / "other")
    with pytest.raises(UntrustedDataError, match="not signed by the CA sent with it"):
        check_issued(good.pem, other_ca.cert_pem, ours, "dev-1")
    with pytest.raises(UntrustedDataError, match="not valid now"):
        check_issued(good.pem, ca.cert_pem, ours, "dev-1", now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    with pytest.raises(UntrustedDataError, match="not PEM"):
        check_issued("junk", ca.cert_pem, ours, "dev-1")


def test_a_broker_ca_from_the_fleet_must_be_pem_certificates(tmp_path: Path) -> None:
    ca = DeviceCA.create(tmp_path / "ca").cert_pem
    assert is_pem_certificates(ca) and is_pem_certificates(ca + ca)
    for bad in (None, 42, "", "hello", ca.replace("MII", "XXX"), ca * 200):
        assert not is_pem_certificates(bad)


def test_agent_run_warns_about_a_readable_key_and_a_certificate_near_expiry(tmp_path: Path) -> None:
    ca = DeviceCA.create(tmp_path / "ca")
    ours = new_key_and_csr()
    cert, key = tmp_path / "device.crt", tmp_path / "device.key"
    cert.write_text(ca.issue(parse_csr(ours.csr_pem), "dev-1", 30 * 86400).pem)
    key.write_bytes(ours.key_pem)
    key.chmod(0o600)
    assert identity_warnings(cert, key) == []
    key.chmod(0o644)
    now = dt.datetime.now(dt.UTC)
    events = [e for e, _ in identity_warnings(cert, key, now + dt.timedelta(days=20))]
    assert events == ["agent.client_key_readable", "agent.client_certificate_expiring"]
    expired = identity_warnings(cert, None, now + dt.timedelta(days=31))
    assert [e for e, _ in expired] == ["agent.client_certificate_expired"]
    assert "re-enroll" in expired[0][1]["hint"]
    assert identity_warnings(None, None) == [] and identity_warnings(tmp_path / "missing.crt", None) == []
