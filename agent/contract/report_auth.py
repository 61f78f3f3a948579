"""Signed device reports (issue 14): the contract the agent signs and the fleet verifies with.

Why: today the broker ACL is the only thing tying a report to its device; a misconfigured ACL
or a compromised broker could let one device (or the broker) report an install for another
(Uptane's signed version reports; aktualizr#89). Each device gets its own Ed25519 key (made on
the device, the public half registered with the fleet at enrollment); every reported state,
event, telemetry report and dataset chunk carries a signature over what it says, for whom, and
a per-device counter, so the fleet can refuse and count unsigned or wrongly signed reports and
drop replays.

What is signed: ``b"efr1\\0" + kind + b"\\0" + device_id + b"\\0" + str(counter) + b"\\0" +
sha256(payload)`` where `kind` is the topic kind (`reported`, `events`, `telemetry`, `dataset`),
so a signature cannot be moved to another device, another topic or another payload. The signature
travels beside the unchanged payload (an MQTT v5 user property ``efsig: <counter>.<base64 sig>``),
so the payload formats and an older fleet are unaffected. The counter is strictly increasing per
device (the agent persists it); the fleet accepts each (device, kind, counter) once
(`fleet.devices.report_keys`). The wiring: agent/daemon/report_signer.py, fleet/delivery/report_verify.py.
Pure: keys, bytes and the last counter in; a counter or a `ReportAuthError` out.
"""

from __future__ import annotations

import base64
import hashlib
import re

from agent.errors import BadReportSignatureError, ReplayedReportError, UnsignedReportError

HEADER = "efsig"
KINDS = ("reported", "events", "telemetry", "dataset")
_VALUE = re.compile(r"^([0-9]{1,19})\.([A-Za-z0-9+/]{86}==)\Z")


def signed_bytes(kind: str, device_id: str, counter: int, payload: bytes) -> bytes:
    """What the device's key signs for one report."""
    if kind not in KINDS:
        raise ValueError(f"unknown report kind {kind!r}")
    digest = hashlib.sha256(payload).hexdigest()
    return b"\0".join([b"efr1", kind.encode(), device_id.encode(), str(counter).encode(), digest.encode()])


def sign_report(private_key_pem: bytes, kind: str, device_id: str, counter: int, payload: bytes) -> str:
    """The `efsig` header value for one report (`counter` strictly increasing per device)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("a device report key must be Ed25519")
    sig = key.sign(signed_bytes(kind, device_id, counter, payload))
    return f"{counter}.{base64.b64encode(sig).decode()}"


def verify_report(public_key_raw: bytes, kind: str, device_id: str, payload: bytes, header: str | None,
                  last_counter: int) -> int:
    """Check one received report against the device's registered public key; return its counter.

    Raises `UnsignedReportError`, `BadReportSignatureError` or `ReplayedReportError`; the caller
    must count and drop the report then, and keep `last_counter` unchanged.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    match = _VALUE.fullmatch(header or "")
    if match is None:
        raise UnsignedReportError(f"{kind} report from {device_id!r} carries no valid {HEADER} signature")
    counter = int(match.group(1))
    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(
            base64.b64decode(match.group(2)), signed_bytes(kind, device_id, counter, payload))
    except (InvalidSignature, ValueError):
        raise BadReportSignatureError(
            f"{kind} report from {device_id!r} is not signed by that device's key") from None
    if counter <= last_counter:
        raise ReplayedReportError(
            f"{kind} report from {device_id!r} replayed: counter {counter} is not above {last_counter}")
    return counter


def new_device_key() -> tuple[bytes, bytes]:
    """A fresh key pair: (PKCS#8 PEM private key, kept 0600 on the device; raw 32-byte public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, raw
