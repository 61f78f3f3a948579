"""Test certificates: a CA that signs the broker's server certificate (127.0.0.1 / localhost),
a foreign CA for bad paths, and device key pairs and CSRs made the way `agent enroll` makes them.

Everything is generated per test run with `cryptography`; nothing is committed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class ScratchCA:
    """A throwaway CA (key in memory, certificate written to `cert_path`)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_path: Path

    @classmethod
    def make(cls, directory: Path, name: str) -> ScratchCA:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(key, hashes.SHA256()))
        path = directory / f"{name.replace(' ', '-')}.crt"
        path.write_bytes(_pem_cert(cert))
        return cls(key, cert, path)

    def sign(self, public_key: ec.EllipticCurvePublicKey, cn: str, *, server: bool,
             not_after: dt.datetime | None = None) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self.cert.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(hours=1))
                   .not_valid_after(not_after or now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            eku = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            eku = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def server_files(self, directory: Path) -> tuple[Path, Path]:
        """(server.crt, server.key) for 127.0.0.1 and localhost, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign(key.public_key(), "localhost", server=True)
        crt, pem = directory / "server.crt", directory / "server.key"
        crt.write_bytes(_pem_cert(cert))
        pem.write_bytes(_pem_key(key))
        pem.chmod(0o600)
        return crt, pem

    def client_files(self, directory: Path, cn: str,
                     not_after: dt.datetime | None = None) -> tuple[Path, Path]:
        """(client.crt, client.key) with CN `cn`, signed by this CA (a foreign CA in bad-path tests)."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign(key.public_key(), cn, server=False, not_after=not_after)
        crt, pem = directory / f"{cn}.crt", directory / f"{cn}.key"
        crt.write_bytes(_pem_cert(cert))
        pem.write_bytes(_pem_key(key))
        pem.chmod(0o600)
        return crt, pem


def device_csr(cn: str = "whatever-the-device-asks") -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A device key pair and a PEM CSR over it (subject `cn`, which the fleet must ignore)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def tampered_csr() -> str:
    """A CSR whose signature no longer matches: one byte of the signed part (the subject) flipped."""
    _, pem = device_csr("device-asks-for-this")
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    at = der.find(b"device-asks-for-this")
    der[at] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(_pem_key(key))
    path.chmod(0o600)
    return path


def mqtt_tls_probe(port: int, server_ca: Path, cert: Path | None, key: Path | None,
                   client_id: str = "probe", timeout: float = 10.0) -> str:
    """Open a TLS connection (client certificate optional), send an MQTT 3.1.1 CONNECT and say
    what happened: `"connack 0"` (accepted), `"connack <rc>"` (refused by MQTT), or the TLS or
    socket error by which the broker refused the handshake (e.g. `certificate revoked`)."""
    ctx = ssl.create_default_context(cafile=str(server_ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(cid).to_bytes(2, "big") + cid
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(bytes([0x10, len(variable)]) + variable)
            answer = tls.recv(4)
    except ssl.SSLError as exc:
        return f"tls refused: {exc.reason or exc}"
    except OSError as exc:
        return f"connection failed: {exc}"
    if len(answer) < 4 or answer[0] != 0x20:
        return f"connection closed ({answer!r})"
    return f"connack {answer[3]}"
