"""The device's X25519 wrap key: the private half opens the content keys of sealed bundles.

Made by `edgefleet agent enroll` (both identities) and kept 0600 in a 0700 `keys` directory of
the agent's state directory; the public half goes to the fleet in the enrollment request
(`wrap_public_key`, base64 of the raw 32 bytes). It never leaves the device and is never logged.

Errors: `load_wrap_key` raises `MisuseError` (missing, unreadable or not an X25519 key, or
readable by others); `write_wrap_key` and `create_wrap_key` raise `OSError`.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from agent.contract.envelope import b64, public_key_raw
from agent.durable_io import write_durably
from agent.errors import MisuseError

WRAP_KEY_FILE = "wrap-x25519.pem"


def wrap_key_path(state_dir: Path) -> Path:
    return Path(state_dir) / "keys" / WRAP_KEY_FILE


def new_wrap_key() -> tuple[bytes, str]:
    """A new key pair in memory: (the private key as PKCS#8 PEM, the public key as base64)."""
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return pem, b64(public_key_raw(key.public_key()))


def write_wrap_key(state_dir: Path, pem: bytes) -> Path:
    """Write the private key 0600 into `<state_dir>/keys/` (0700), replacing any old one."""
    path = wrap_key_path(state_dir)
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)
    write_durably(path, pem, mode=0o600)
    return path


def create_wrap_key(state_dir: Path) -> str:
    """Make and write a new key pair (replacing any old one); return the public key as base64."""
    pem, public = new_wrap_key()
    write_wrap_key(state_dir, pem)
    return public


def load_wrap_key(state_dir: Path) -> X25519PrivateKey:
    """The device's private wrap key."""
    path = wrap_key_path(state_dir)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise MisuseError(f"no wrap key at {path}: {exc.strerror} "
                          "(enrolled before bundle encryption?)") from None
    if mode & 0o077:
        raise MisuseError(f"wrap key {path} is readable by others (mode {mode & 0o777:o}); expected 0600")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise MisuseError(f"{path} is not a PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise MisuseError(f"{path} is not an X25519 key")
    return key
