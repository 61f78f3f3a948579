"""Device enrollment: one-time token in, identity + broker credentials + trusted TUF root out.

Broker credentials are written for Mosquitto: `data_dir/broker/passwd` holds one
`username:$7$<iterations>$<salt>$<hash>` line per device that is not revoked — the
PBKDF2-SHA512 format `mosquitto_passwd` (Mosquitto 2.x) writes — regenerated after every
enrollment and revocation. Point Mosquitto's `password_file` at it and send SIGHUP (or
`systemctl reload mosquitto`) to apply; a revoked device can no longer connect.

A device that sends a CSR (`CertRequest`) gets a client certificate from the fleet's device CA
instead (`fleet/trust/device_ca.py`: CN = the id assigned here, the CSR's subject ignored) and no
password line: the broker's mutual-TLS listener takes its username from the certificate, and
revocation goes through the CRL (`fleet/devices/certificates.py`). The CSR is checked before the
token is consumed, so a broken one does not spend it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509

from fleet.access.auth import TOKEN_PREFIX, hash_secret, new_secret
from fleet.access.credentials import EnrollmentToken
from fleet.db.rows import iso
from fleet.devices.inventory import CertificateFacts
from fleet.devices.report_keys import parse_public_key
from fleet.devices.wrap_keys import check_public_key, store_wrap_key
from fleet.errors import AuthError, FleetInputError, FleetMisuseError
from fleet.store import Store
from fleet.trust.device_ca import DeviceCA, parse_csr

MOSQUITTO_ITERATIONS = 101  # mosquitto_passwd's default for the $7$ format
MOSQUITTO_SALT_BYTES = 12
_ROOT_NAME_RE = re.compile(r"^(\d+)\.root\.json$")
MAX_ROOT_BYTES = 1024 * 1024


def mosquitto_password_hash(password: str, salt: bytes | None = None,
                            iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """The `$7$` PBKDF2-SHA512 hash Mosquitto 2.x reads from a password file."""
    salt = salt if salt is not None else secrets.token_bytes(MOSQUITTO_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: Path, credentials: list[tuple[str, str]]) -> None:
    """Atomically replace the Mosquitto password file (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{user}:{pw_hash}\n" for user, pw_hash in credentials)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".passwd.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).chmod(0o600)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_broker_credentials(store: Store, path: Path) -> int:
    """Rewrite the password file from the store; returns the number of device lines."""
    creds = store.devices.broker_credentials()
    write_password_file(path, creds)
    return len(creds)


def load_trusted_root(repo_dir: Path) -> dict[str, Any] | None:
    """The newest root metadata in the repository (`metadata/` or top level), or None if absent.

    Looks for the highest `N.root.json`, then `root.json`. Raises FleetMisuseError when the
    file exists but is not JSON (a broken repository should not hand devices garbage).
    """
    candidates: list[tuple[int, Path]] = []
    for folder in (repo_dir / "metadata", repo_dir):
        if folder.is_dir():
            for p in folder.iterdir():
                m = _ROOT_NAME_RE.match(p.name)
                if m:
                    candidates.append((int(m.group(1)), p))
            if (folder / "root.json").is_file():
                candidates.append((-1, folder / "root.json"))
    if not candidates:
        return None
    path = max(candidates, key=lambda c: c[0])[1]
    raw = path.read_bytes()
    if len(raw) > MAX_ROOT_BYTES:
        raise FleetMisuseError(f"{path} is larger than {MAX_ROOT_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FleetMisuseError(f"trusted root {path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise FleetMisuseError(f"trusted root {path} is not a JSON object")
    return doc


def create_enrollment_token(store: Store, labels: dict[str, str], ttl_seconds: float,
                            actor: str) -> tuple[EnrollmentToken, str]:
    """A one-time token; returns (public record, plaintext shown once). Raises FleetInputError."""
    token_id, plaintext, digest = new_secret(TOKEN_PREFIX)
    return store.access.insert_token(token_id, digest, labels, ttl_seconds, actor), plaintext


@dataclass(frozen=True)
class CertRequest:
    """A device asking for a client certificate instead of a password (`POST /v1/enroll` with a CSR)."""

    csr_pem: str
    ca: DeviceCA
    validity_s: float
    broker_url: str  # the mutual-TLS listener (mqtts://), told to the device instead of `broker_url`


MAX_BROKER_CA_BYTES = 64 * 1024


def load_broker_ca(path: Path | None) -> str | None:
    """The broker's server CA handed to devices, checked to be PEM certificates. Raises FleetMisuseError."""
    if path is None:
        return None
    try:
        raw = path.read_bytes()[: MAX_BROKER_CA_BYTES + 1]
        if len(raw) > MAX_BROKER_CA_BYTES:
            raise FleetMisuseError(f"device_broker_ca_file {path} is larger than {MAX_BROKER_CA_BYTES} bytes")
        x509.load_pem_x509_certificates(raw)
    except OSError as exc:
        raise FleetMisuseError(f"cannot read device_broker_ca_file {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise FleetMisuseError(f"device_broker_ca_file {path} holds no PEM certificate") from None
    return raw.decode("ascii", "replace")


def enroll_device(store: Store, token: str, facts: dict[str, Any], broker_url: str, topic_prefix: str,
                  repo_dir: Path, passwd_path: Path, cert: CertRequest | None = None,
                  broker_ca: str | None = None) -> dict[str, Any]:
    """Exchange a one-time token for a device identity, broker credentials and the TUF root.

    The token is consumed and the device created in one transaction, so a token yields at
    most one device. `broker_url` is the device-facing URL and must carry no credentials (the
    device logs in with its own). With `cert`, the CSR is checked before the token is touched
    (a broken CSR does not spend it), and the device gets a certificate whose CN is the id
    assigned here instead of a password. Raises AuthError (token unknown/used/expired),
    FleetInputError (facts, CSR), FleetMisuseError (broken repository root, credentials in the URL).
    """
    csr = parse_csr(cert.csr_pem) if cert is not None else None
    report_key = facts.get("report_public_key")  # checked before the token is spent
    report_key = parse_public_key(report_key) if report_key is not None else None
    if "@" in urlsplit(broker_url).netloc:
        raise FleetMisuseError("the device-facing broker URL carries credentials: refusing to hand them out")
    if not token.startswith(TOKEN_PREFIX):
        raise AuthError("not an enrollment token")
    for key in ("agent_version", "architecture"):
        if facts.get(key) is not None and not isinstance(facts[key], str):
            raise FleetInputError(f"{key} must be a string")
    wrap_key = facts.get("wrap_public_key")
    if wrap_key is not None:  # bundle encryption (fleet.devices.wrap_keys): checked before the token is spent
        check_public_key(wrap_key)
    root = load_trusted_root(repo_dir)
    device_id = "dev-" + secrets.token_hex(8)
    password: str | None = None
    certificate: dict[str, Any] | None = None
    facts_of_cert: CertificateFacts | None = None
    if cert is not None and csr is not None:
        issued = cert.ca.issue(csr, device_id, cert.validity_s)  # unused if the token is refused below
        facts_of_cert = CertificateFacts(issued.serial, issued.fingerprint, iso(issued.not_after.timestamp()))
        certificate = {"pem": issued.pem, "ca_pem": cert.ca.cert_pem, "serial": issued.serial,
                       "fingerprint": issued.fingerprint, "not_after": facts_of_cert.not_after}
        broker_url = cert.broker_url
    else:
        password = secrets.token_urlsafe(24)
    with store.tx():
        tok = store.access.consume_token(hash_secret(token), device_id)
        device = store.devices.create(device_id, tok.labels, facts, device_id,
                                      mosquitto_password_hash(password) if password else "",
                                      f"enrollment-token:{tok.id}", certificate=facts_of_cert)
        if wrap_key is not None:
            store_wrap_key(store, device_id, wrap_key)
        if report_key is not None:  # the device's report signing key (issue 14), audited with the device
            store.report_keys.register(device_id, report_key, f"enrollment-token:{tok.id}", audited=False)
    sync_broker_credentials(store, passwd_path)
    return {
        "device_id": device_id,
        "labels": device.labels,
        # `topic_prefix` is the topic root, as in the agent's config (`<prefix>/v1/devices/<id>/...`
        # is derived from it); the URL never carries the fleet's own broker login to a device.
        "broker": {"url": public_broker_url(broker_url), "username": device_id, "password": password,
                   "ca_pem": broker_ca, "client_id": device_id, "topic_prefix": topic_prefix},
        "certificate": certificate,
        "tuf_root": root,
    }


def public_broker_url(url: str) -> str:
    """`url` without user info: `fleet serve --broker mqtt://fleet:secret@host` is the fleet's login."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
