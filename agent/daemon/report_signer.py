"""The agent's side of signed device reports (issue 14): its report key and a counter never reused.

Why: the fleet trusts a reported state, lifecycle event or telemetry report only when it is
signed by the device's own Ed25519 key (`agent.contract.report_auth`, docs/trust.md) with a
counter above the last one it accepted from that device, so neither a neighbour nor the broker
can report for this device or replay what it said. The key is made at enrollment
(`edgefleet agent enroll`, or `edgefleet agent report-key` for a device enrolled before keys) and
kept 0600 in the state directory as `report.key`; it never leaves the device.

The counter must never repeat, not even after a crash or a power cut: a reused counter is a
report the fleet drops as a replay. Writing the counter before every message would cost an
fsync per report, so counters are *reserved* in blocks: `report-counter` holds the highest
counter this device may have used; before the first counter above it is handed out, the file
is raised by `BLOCK` and made durable. A crash skips at most the rest of a block, never repeats.
The start of each run is also at least the wall clock in microseconds, so a state directory
restored from a backup (an older `report-counter`) does not reuse counters either, as long as
the clock is not set back.

`ReportSigner.sign(kind, payload)` is generic: any device -> fleet message kind the contract
knows (`report_auth.KINDS`) can use it; it returns the MQTT user properties to publish with.
Thread-safe (the daemon signs from the MQTT network thread and its own threads).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.contract import report_auth
from agent.durable_io import write_durably
from agent.errors import ConfigError
from agent.logs import log_event

log = logging.getLogger("edgefleet.agent")
KEY_FILE = "report.key"
COUNTER_FILE = "report-counter"
BLOCK = 1000
Properties = tuple[tuple[str, str], ...]


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / KEY_FILE


def ensure_key(state_dir: Path) -> tuple[bytes, bool]:
    """The device's raw public report key, making the key pair first if there is none.

    Returns (raw 32-byte public key, made now). The private key is written 0600, durably.
    Raises ConfigError when an existing key file is not an Ed25519 private key.
    """
    path = key_path(state_dir)
    if path.exists():
        return public_key_of(path.read_bytes(), path), False
    private, public = report_auth.new_device_key()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_durably(path, private, mode=0o600)
    return public, True


def public_key_of(pem: bytes, where: Path) -> bytes:
    """The raw public key of a PEM Ed25519 private key. Raises ConfigError."""
    from cryptography.hazmat.primitives import serialization  # lazy: cryptography only with a key
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{where} is not an Ed25519 key (a device report key must be)")
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class CounterReservation:
    """Strictly increasing counters, durable across crashes by reserving `block` at a time."""

    def __init__(self, path: Path, block: int = BLOCK, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.block = block
        self._lock = threading.Lock()
        try:
            stored = int(self.path.read_text().strip() or "0")
        except FileNotFoundError:
            stored = 0
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the report counter {self.path}: {exc}") from None
        self._next = max(stored + 1, int(clock() * 1_000_000))
        self._reserved = self._next - 1  # nothing of this run reserved yet

    @property
    def reserved(self) -> int:
        return self._reserved

    def take(self) -> int:
        """The next counter; persisted (as part of a reserved block) before it is returned."""
        with self._lock:
            counter = self._next
            if counter > self._reserved:
                ceiling = counter + self.block - 1
                write_durably(self.path, f"{ceiling}\n".encode(), mode=0o600)
                self._reserved = ceiling
            self._next = counter + 1
            return counter


#: RFC 8410 section 7: a PKCS#8 (v1) Ed25519 private key is this DER prefix and the 32-byte seed,
#: which is exactly what `new_device_key` writes.
_PKCS8_ED25519_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


def _plain_seed(private_pem: bytes) -> bytes | None:
    """The seed of a PEM key in the plain RFC 8410 form, or None for any other form (which
    cryptography then parses: encrypted, v2 with the public key, another algorithm)."""
    lines = private_pem.strip().splitlines()
    if len(lines) < 3 or (lines[0], lines[-1]) != (_PEM_BEGIN, _PEM_END):
        return None
    try:
        der = base64.b64decode(b"".join(lines[1:-1]), validate=True)
    except ValueError:
        return None
    if len(der) != 48 or not der.startswith(_PKCS8_ED25519_PREFIX):
        return None
    return der[16:]


def signing_function(private_pem: bytes) -> Callable[[bytes], bytes]:
    """`sign(message) -> 64-byte Ed25519 signature` for the device key `private_pem`.

    An agent signs every report, so the signing library stays loaded for the life of the
    process: PyNaCl (libsodium) costs it 1.3 MB of RSS where cryptography's module costs 8.0
    (benchmarks.md, agent_footprint). Ed25519 signatures are deterministic, so both give the
    same bytes; cryptography stays the fallback for key files in another form and where PyNaCl
    is not installed. Raises ConfigError when the key is not an Ed25519 private key.
    """
    seed = _plain_seed(private_pem)
    if seed is not None:
        try:
            from nacl.signing import SigningKey  # lazy: only on devices with a report key
        except ImportError:
            pass
        else:
            nacl_key = SigningKey(seed)
            return lambda message: nacl_key.sign(message).signature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # lazy: as above
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the device report key is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("the device report key is not Ed25519")
    return key.sign


class ReportSigner:
    """Signs this device's messages: `sign(kind, payload)` -> the `efsig` user property."""

    def __init__(self, private_pem: bytes, device_id: str, counters: CounterReservation) -> None:
        self._sign = signing_function(private_pem)
        self.device_id = device_id
        self.counters = counters

    @classmethod
    def load(cls, state_dir: Path, device_id: str,
             clock: Callable[[], float] = time.time) -> ReportSigner | None:
        """The signer of the key in `state_dir`, or None (logged) when the device has no key yet."""
        path = key_path(state_dir)
        if not path.exists():
            log_event(log, "agent.reports_unsigned", logging.WARNING, key=str(path),
                      hint="run `edgefleet agent report-key` and register the key with the fleet")
            return None
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # never leave the private key readable by others
        return cls(path.read_bytes(), device_id, CounterReservation(Path(state_dir) / COUNTER_FILE,
                                                                    clock=clock))

    def sign(self, kind: str, payload: bytes) -> Properties:
        """The user properties that carry this message's signature (a fresh counter each call)."""
        counter = self.counters.take()
        sig = self._sign(report_auth.signed_bytes(kind, self.device_id, counter, payload))
        return ((report_auth.HEADER, f"{counter}.{base64.b64encode(sig).decode()}"),)


def sign_or_nothing(signer: ReportSigner | None, kind: str, payload: bytes) -> Properties:
    """`signer.sign(...)`, or no properties for a device without a key (an unsigned message)."""
    return signer.sign(kind, payload) if signer is not None else ()
