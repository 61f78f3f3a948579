"""The fleet's device CA: issues each enrolled device a client certificate and signs the CRL.

Why a CA of its own: with `require_certificate true` and `use_identity_as_username true`,
Mosquitto takes a device's username from its certificate's CN, so whoever can sign a
certificate can name any device. The CA therefore signs only what the fleet decides: the
device asks with a CSR (proving that it holds the private key, which never leaves it), and
the certificate's subject is the device id the fleet assigned, whatever the CSR asked for.

Layout (made on first start beside the TUF keys, `fleet.components.ensure_trust`)::

    device-ca/            0700
      ca.key              PKCS#8 PEM, EC P-256, mode 0600
      ca.crt              the CA certificate (Mosquitto's `cafile` on the mutual-TLS listener)
      crl.pem             the revocation list (Mosquitto's `crlfile`), rewritten at every revocation

Time comes from an injected clock so validity and expiry are testable. Errors: `FleetInputError`
for a CSR that is not PEM, whose signature does not verify or whose key is weak;
`FleetMisuseError` when the CA files are missing or unreadable.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.errors import FleetInputError, FleetMisuseError
from fleet.trust.keys import atomic_write

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CRL = "crl.pem"
CA_VALIDITY_DAYS = 10 * 365
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
Clock = Callable[[], float]


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate as issued: what the inventory records and the device receives."""

    pem: str
    serial: str  # lower-case hex, as `openssl x509 -serial` prints it (case aside)
    fingerprint: str  # "sha256:<hex>" of the DER encoding
    not_before: dt.datetime
    not_after: dt.datetime


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def parse_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """A CSR whose self-signature verifies and whose key is EC P-256/P-384 or RSA >= 2048 bits.

    The signature proves the requester holds the private key of the public key it submits;
    a CSR that fails it was tampered with or built wrongly. Raises FleetInputError.
    """
    raw = pem.encode() if isinstance(pem, str) else pem
    if len(raw) > MAX_CSR_BYTES:
        raise FleetInputError(f"csr: larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(raw)
    except ValueError:
        raise FleetInputError("csr: not a PEM certificate signing request "
                              "(-----BEGIN CERTIFICATE REQUEST-----)") from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # cryptography raises UnsupportedAlgorithm or InvalidSignature internals
        valid = False
    if not valid:
        raise FleetInputError("csr: its signature does not verify (tampered, or not signed by the key it "
                              "carries)")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise FleetInputError(f"csr: curve {key.curve.name} is not accepted (use P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise FleetInputError(f"csr: RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})")
    else:
        raise FleetInputError("csr: only EC (P-256, P-384) and RSA keys are accepted")
    return csr


def fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


class DeviceCA:
    """The CA's key and certificate on disk; `create` once, then `open`."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                 clock: Clock = time.time) -> None:
        self.directory = directory
        self._key = key
        self.cert = cert
        self.clock = clock

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @staticmethod
    def exists(directory: Path) -> bool:
        return (directory / CA_KEY).is_file() and (directory / CA_CERT).is_file()

    @classmethod
    def create(cls, directory: Path, name: str = "edgefleet device CA", clock: Clock = time.time) -> DeviceCA:
        """Make a new CA (key 0600 in a 0700 directory) and an empty CRL.

        Raises FleetMisuseError if one exists."""
        if cls.exists(directory):
            raise FleetMisuseError(f"a device CA already exists in {directory}")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is masked by the umask
        key = ec.generate_private_key(ec.SECP256R1())
        now = _utc(clock())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        atomic_write(directory / CA_KEY, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            mode=0o600)
        atomic_write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        ca = cls(directory, key, cert, clock)
        ca.write_crl([])
        return ca

    @classmethod
    def open(cls, directory: Path, clock: Clock = time.time) -> DeviceCA:
        """Load the CA. Raises FleetMisuseError (missing, unreadable, not an EC key)."""
        if not cls.exists(directory):
            raise FleetMisuseError(f"no device CA in {directory}: `fleet serve` creates it on first start")
        try:
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        except (OSError, ValueError) as exc:
            raise FleetMisuseError(f"device CA in {directory} is unreadable: {type(exc).__name__}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FleetMisuseError(f"device CA key in {directory} is not an EC key")
        return cls(directory, key, cert, clock)

    def issue(self, csr: x509.CertificateSigningRequest, device_id: str,
              validity_s: float) -> IssuedCertificate:
        """A client certificate for `device_id` over the CSR's public key (its subject is ignored).

        CN = device id (Mosquitto's username with `use_identity_as_username`), KeyUsage
        digitalSignature, EKU clientAuth, not a CA; valid from a minute ago (clock skew) for
        `validity_s` seconds, never past the CA's own expiry.
        """
        now = _utc(self.clock())
        not_before = now - dt.timedelta(minutes=1)
        not_after = min(now + dt.timedelta(seconds=validity_s), self.cert.not_valid_after_utc)
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise FleetInputError("csr: only EC and RSA keys are accepted")
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.cert.subject).public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM).decode(),
                                 format(cert.serial_number, "x"), fingerprint(cert), not_before, not_after)

    def crl_pem(self, revoked: Iterable[tuple[str, dt.datetime]], validity_s: float = 30 * 86400.0) -> bytes:
        """A CRL listing `(serial hex, revoked at)`, next update `validity_s` from now.

        OpenSSL refuses every client once a CRL's next update has passed, so the fleet re-signs it
        well before (`fleet.devices.certificates.CrlRefresher`).
        """
        now = _utc(self.clock())
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - dt.timedelta(minutes=1))
                   .next_update(now + dt.timedelta(seconds=validity_s)))
        for serial, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(at).build())
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def write_crl(self, revoked: Iterable[tuple[str, dt.datetime]], validity_s: float = 30 * 86400.0) -> Path:
        """Atomically replace `crl.pem` (0644: the broker reads it; the directory is the guard)."""
        atomic_write(self.crl_path, self.crl_pem(revoked, validity_s), mode=0o644)
        return self.crl_path
