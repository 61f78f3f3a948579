"""The device's own TLS identity: a key pair made here, a CSR for the fleet, a check of what comes back.

Why on the device: the private key is the device's identity at the broker, so it is generated
here and never sent anywhere; the fleet only sees a CSR, which proves possession of the key.
What the fleet returns is checked before it is written: the certificate must be over our
public key, name the device id the fleet assigned (its CN, which Mosquitto takes as the
username), be usable for TLS client authentication, and be issued by the CA sent with it.
A fleet (or something in between) that answers with anything else is refused.

Errors: `agent.errors.UntrustedDataError` for a certificate that fails a check.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import UntrustedDataError

CSR_SUBJECT = "edgefleet-device"  # the fleet ignores the subject and names the device itself


@dataclass(frozen=True)
class KeyAndCsr:
    """A fresh EC P-256 key (PEM, PKCS#8, unencrypted: the file is 0600) and its CSR (PEM)."""

    key_pem: bytes
    csr_pem: str
    public_der: bytes


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def new_key_and_csr() -> KeyAndCsr:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CSR_SUBJECT)]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return KeyAndCsr(key_pem, csr.public_bytes(serialization.Encoding.PEM).decode(),
                     _public_der(key.public_key()))


def is_pem_certificates(text: object, max_bytes: int = 64 * 1024) -> bool:
    """Whether `text` is one or more PEM certificates (a CA bundle the fleet hands out)."""
    if not isinstance(text, str) or len(text) > max_bytes:
        return False
    try:
        return bool(x509.load_pem_x509_certificates(text.encode()))
    except ValueError:
        return False


def check_issued(cert_pem: str, ca_pem: str, ours: KeyAndCsr, device_id: str,
                 now: dt.datetime | None = None) -> x509.Certificate:
    """The issued certificate, after checking it against our key, the device id and the CA.

    Raises UntrustedDataError naming the first check that fails.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
    except ValueError:
        raise UntrustedDataError("the fleet's certificate or CA is not PEM") from None
    if _public_der(cert.public_key()) != ours.public_der:  # type: ignore[arg-type]
        raise UntrustedDataError("the issued certificate is not for this device's key")
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [device_id]:
        raise UntrustedDataError(f"the issued certificate names {cns!r}, not the assigned id {device_id!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as exc:  # InvalidSignature, ValueError (wrong issuer), TypeError (key type)
        raise UntrustedDataError(f"the issued certificate is not signed by the CA sent with it: "
                                 f"{type(exc).__name__}") from None
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise UntrustedDataError("the issued certificate is not for TLS client authentication")
    moment = now or dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise UntrustedDataError(f"the issued certificate is not valid now (valid "
                                 f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} .. "
                                 f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; check the clock)")
    return cert
