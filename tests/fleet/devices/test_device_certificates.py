"""The device CA and certificate enrollment: what is issued, what is recorded, what is refused.

The CA is the real one (`fleet/trust/device_ca.py`, files under a data directory); enrollment
goes through the API (FastAPI TestClient) with real one-time tokens. The broker side (mutual
TLS, CRL, revocation) is in test_mtls_broker.py.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient

from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.components import ensure_trust
from fleet.devices.certificates import CrlRefresher, write_crl
from fleet.devices.revocation import revoke_device
from fleet.errors import FleetInputError, FleetMisuseError
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.trust.device_ca import DeviceCA, parse_csr
from tests.support.tls import device_csr, tampered_csr

CERT_URL = "mqtts://broker.example:8884"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.unit
def test_the_ca_is_private_and_issues_only_what_the_fleet_decides(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    ca = DeviceCA.create(tmp_path / "device-ca", clock=lambda: now)
    assert (mode(ca.directory), mode(ca.directory / "ca.key")) == (0o700, 0o600)
    assert DeviceCA.open(ca.directory).cert == ca.cert
    with pytest.raises(FleetMisuseError, match="already exists"):
        DeviceCA.create(ca.directory)
    key, pem = device_csr("dev-admin")  # a device asking for someone else's name
    issued = ca.issue(parse_csr(pem), "dev-0123", validity_s=90 * 86400)
    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    assert [a.value for a in cert.subject] == ["dev-0123"]  # the subject asked for is ignored
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-0123"
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.cert)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    start = dt.datetime.fromtimestamp(now, dt.UTC)
    assert cert.not_valid_after_utc == start + dt.timedelta(days=90) == issued.not_after
    assert cert.not_valid_before_utc < start
    assert issued.serial == format(cert.serial_number, "x")
    assert issued.fingerprint == "sha256:" + cert.fingerprint(hashes.SHA256()).hex()
    other = ca.issue(parse_csr(pem), "dev-0124", 3600)
    assert other.serial != issued.serial


@pytest.mark.unit
def test_bad_csrs_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(FleetInputError, match="signature does not verify"):
        parse_csr(tampered_csr())
    with pytest.raises(FleetInputError, match="not a PEM certificate signing request"):
        parse_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(FleetInputError, match="larger than"):
        parse_csr("x" * 20000)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(weak, hashes.SHA256())
    with pytest.raises(FleetInputError, match="1024 bits"):
        parse_csr(csr.public_bytes(serialization.Encoding.PEM))
    k1 = ec.generate_private_key(ec.SECP521R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(k1, hashes.SHA256())
    with pytest.raises(FleetInputError, match="secp521r1 is not accepted"):
        parse_csr(csr.public_bytes(serialization.Encoding.PEM))


@pytest.mark.unit
def test_the_crl_lists_revoked_serials_and_expires(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    ca = DeviceCA.create(tmp_path / "ca", clock=lambda: now)
    empty = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert list(empty) == [] and empty.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    at = dt.datetime.fromtimestamp(now - 60, dt.UTC)
    crl = x509.load_pem_x509_crl(ca.crl_pem([("abc123", at)], validity_s=7 * 86400))
    assert [(r.serial_number, r.revocation_date_utc) for r in crl] == [(0xABC123, at)]
    assert crl.next_update_utc == dt.datetime.fromtimestamp(now, dt.UTC) + dt.timedelta(days=7)


@dataclass
class World:
    settings: FleetSettings
    store: Store
    operator: str

    def client(self, **settings: Any) -> TestClient:
        return TestClient(create_app(self.settings.model_copy(update=settings), self.store),
                          raise_server_exceptions=False)

    def token(self, client: TestClient) -> str:
        res = client.post("/v1/enrollment-tokens", json={"labels": {"site": "lab"}},
                          headers={"Authorization": f"Bearer {self.operator}"})
        assert res.status_code == 201, res.text
        return str(res.json()["token"])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = FleetSettings(data_dir=tmp_path / "data", device_cert_broker_url=CERT_URL, device_cert_days=30)
    ensure_trust(settings)  # keys, repository and the device CA, as on a first `fleet serve`
    store = Store(settings.db_path)
    try:
        yield World(settings, store, create_api_key(store, "op", "operator", "test")[1])
    finally:
        store.close()


def _enroll(client: TestClient, token: str, body: dict[str, Any]) -> Any:
    return client.post("/v1/enroll", json=body, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.integration
def test_a_csr_enrollment_gets_a_certificate_and_no_password(world: World) -> None:
    key, pem = device_csr("root")
    with world.client() as c:
        res = _enroll(c, world.token(c), {"agent_version": "1.0.0", "csr": pem})
    assert res.status_code == 201, res.text
    body = res.json()
    device_id = body["device_id"]
    broker, issued = body["broker"], body["certificate"]
    assert broker["url"] == CERT_URL and broker["password"] is None
    assert broker["username"] == broker["client_id"] == device_id
    cert = x509.load_pem_x509_certificate(issued["pem"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    assert cert.public_key() == key.public_key()
    ca = DeviceCA.open(world.settings.device_ca_dir)
    assert issued["ca_pem"] == ca.cert_pem
    cert.verify_directly_issued_by(ca.cert)
    days = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    assert 29.9 < days <= 30  # device_cert_days
    device = world.store.devices.get(device_id)
    assert device.identity == "cert"
    assert (device.cert_serial, device.cert_fingerprint, device.cert_not_after) == (
        issued["serial"], issued["fingerprint"], issued["not_after"])
    assert device.cert_serial == format(cert.serial_number, "x")
    # the inventory shows it, the password file has no line for it
    with world.client() as c:
        auth = {"Authorization": f"Bearer {world.operator}"}
        shown = c.get(f"/v1/devices/{device_id}", headers=auth).json()
    assert shown["identity"] == "cert" and shown["cert_fingerprint"] == issued["fingerprint"]
    assert device_id not in world.settings.broker_passwd_path.read_text()
    # a password device beside it still gets its line
    with world.client() as c:
        pw = _enroll(c, world.token(c), {}).json()
    assert pw["certificate"] is None and pw["broker"]["password"]
    assert world.store.devices.get(pw["device_id"]).identity == "password"
    assert pw["device_id"] in world.settings.broker_passwd_path.read_text()


@pytest.mark.integration
def test_a_broken_csr_is_a_clear_422_and_does_not_spend_the_token(world: World) -> None:
    with world.client() as c:
        token = world.token(c)
        bad = _enroll(c, token, {"csr": tampered_csr()})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["msg"].startswith("csr: its signature does not verify")
        garbage = _enroll(c, token, {"csr": "hello"})
        assert garbage.status_code == 422 and "not a PEM" in garbage.text
        assert world.store.devices.count() == 0
        good = _enroll(c, token, {"csr": device_csr()[1]})  # the token still works once
        assert good.status_code == 201, good.text
        again = _enroll(c, token, {"csr": device_csr()[1]})
        assert again.status_code == 401 and "invalid, used or expired" in again.text
    assert world.store.devices.count() == 1


@pytest.mark.integration
def test_csr_enrollment_without_a_tls_listener_or_ca_is_refused_before_the_token(world: World,
                                                                                   tmp_path: Path) -> None:
    with world.client(device_cert_broker_url=None, broker_url="mqtt://127.0.0.1:1883") as c:
        token = world.token(c)
        res = _enroll(c, token, {"csr": device_csr()[1]})
        assert res.status_code == 503 and "device_cert_broker_url" in res.text
    # a TLS device URL is used when no separate one is set
    with world.client(device_cert_broker_url=None, device_broker_url="mqtts://b.example:8883") as c:
        res = _enroll(c, token, {"csr": device_csr()[1]})
        assert res.status_code == 201 and res.json()["broker"]["url"] == "mqtts://b.example:8883"
    # the broker's CA handed to devices must be a PEM certificate, checked before the token is used
    (tmp_path / "not-a-ca.pem").write_text("hello")
    with world.client(device_broker_ca_file=tmp_path / "not-a-ca.pem") as c:
        res = _enroll(c, token := world.token(c), {})
        assert res.status_code == 503 and "holds no PEM certificate" in res.text
    ca_pem = DeviceCA.open(world.settings.device_ca_dir).cert_pem  # any certificate will do here
    (tmp_path / "broker-ca.pem").write_text(ca_pem)
    with world.client(device_broker_ca_file=tmp_path / "broker-ca.pem") as c:
        res = _enroll(c, token, {})
        assert res.status_code == 201 and res.json()["broker"]["ca_pem"] == ca_pem
    with world.client(data_dir=tmp_path / "elsewhere") as c:
        res = _enroll(c, world.token(c), {"csr": device_csr()[1]})
        assert res.status_code == 503 and "no device CA" in res.text
    with pytest.raises(ValueError, match="mqtts://host:port"):
        FleetSettings(device_cert_broker_url="mqtt://plain:1883")


@pytest.mark.integration
def test_revoking_a_certificate_device_puts_its_serial_on_the_crl(world: World) -> None:
    with world.client() as c:
        cert_dev = _enroll(c, world.token(c), {"csr": device_csr()[1]}).json()
        pw_dev = _enroll(c, world.token(c), {}).json()
    crl_path = world.settings.device_ca_dir / "crl.pem"
    revoke_device(world.store, world.settings, pw_dev["device_id"], "test")
    assert list(x509.load_pem_x509_crl(crl_path.read_bytes())) == []
    revoke_device(world.store, world.settings, cert_dev["device_id"], "test", "stolen")
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert [format(r.serial_number, "x") for r in crl] == [cert_dev["certificate"]["serial"]]
    ca = DeviceCA.open(world.settings.device_ca_dir)
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    horizon = (crl.next_update_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400  # type: ignore[operator]
    assert 29.9 < horizon <= 30  # device_crl_days
    assert write_crl(world.store, world.settings) == crl_path
    # the refresher re-signs at start only when the file is older than half its horizon
    refresher = CrlRefresher(world.store, world.settings)
    assert not refresher.due()
    old = crl_path.stat().st_mtime - 16 * 86400
    os.utime(crl_path, (old, old))
    assert refresher.due()
    refresher.refresh()
    assert not refresher.due()
    assert [format(r.serial_number, "x") for r in x509.load_pem_x509_crl(crl_path.read_bytes())] == [
        cert_dev["certificate"]["serial"]]


@pytest.mark.unit
def test_certificate_settings_come_from_the_environment_and_first_start_makes_the_ca(tmp_path: Path) -> None:
    settings = FleetSettings.from_env({"EDGEFLEET_DATA_DIR": str(tmp_path / "d"),
                                       "EDGEFLEET_DEVICE_CERT_BROKER_URL": "mqtts://b.example:8884",
                                       "EDGEFLEET_DEVICE_CERT_DAYS": "7", "EDGEFLEET_DEVICE_CRL_DAYS": "10"})
    assert (settings.device_cert_broker, settings.device_cert_days, settings.device_crl_days) == (
        "mqtts://b.example:8884", 7.0, 10.0)
    with pytest.raises(ValueError, match="no credentials"):
        FleetSettings(device_cert_broker_url="mqtts://u:p@b.example:8884")
    assert FleetSettings(device_broker_url="mqtt://b:1883").device_cert_broker is None
    ensure_trust(settings)
    ca_dir = settings.device_ca_dir
    assert (mode(ca_dir), mode(ca_dir / "ca.key")) == (0o700, 0o600)
    assert (ca_dir / "ca.crt").is_file() and (ca_dir / "crl.pem").is_file()
    before = (ca_dir / "ca.crt").read_bytes()
    ensure_trust(settings)  # a second start keeps the CA
    assert (ca_dir / "ca.crt").read_bytes() == before
