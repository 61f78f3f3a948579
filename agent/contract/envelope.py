"""Wrapping a sealed bundle's content key for each recipient device (the envelope).

Each device makes an X25519 key pair at enrollment and the fleet stores the public half. For a
sealed bundle the fleet publishes a recipients document (`WrappedKeys`) as a TUF target of its
own, at `recipients_target(sha256 of the sealed file)`: one `WrappedKey` per device of the
cohort, each made by ephemeral-static X25519, HKDF-SHA256 and AES-256-GCM. The associated data
binds the sealed file's sha256 and the device id, so a wrapped key copied to another bundle or
relabelled for another device does not open. Adding a device to the cohort later only
publishes a new recipients document: the sealed file (and its TUF hash) stays the same.

Errors: `parse_wrapped_keys` and `unwrap_content_key` raise `BundleEncryptionError` (malformed,
for another bundle, fails authentication) and `BundleNotForThisDeviceError` (no entry for this
device's key); `wrap_content_key` raises `MisuseError` (bad public key).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Annotated, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.contract.strict import Meta, StrictStruct, ValidationError, describe
from agent.errors import BundleEncryptionError, BundleNotForThisDeviceError, MisuseError

WRAP_INFO = b"edgefleet-wrap-v1"
_ZERO_NONCE = bytes(12)  # every key-encryption key is used once (a new ephemeral key per wrap)
MAX_RECIPIENTS = 100_000
MAX_DOCUMENT_BYTES = 32 << 20
_Hex64 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
_B64_32 = Annotated[str, Meta(min_length=43, max_length=44)]


def recipients_target(sealed_sha256: str) -> str:
    """The TUF target path of the recipients document of the sealed file with this sha256."""
    return f"recipients/{sealed_sha256.removeprefix('sha256:').lower()}.json"


def public_key_raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public_raw: bytes) -> str:
    """A short, stable name for one X25519 public key (which of a device's keys a wrap is for)."""
    return hashlib.sha256(public_raw).hexdigest()[:32]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, size: int, what: str) -> bytes:
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise BundleEncryptionError(f"{what} is not base64") from None
    if len(data) != size:
        raise BundleEncryptionError(f"{what} is {len(data)} bytes, not {size}")
    return data


def parse_public_key(text: str) -> X25519PublicKey:
    """A base64 raw X25519 public key (as sent at enrollment). Raises `MisuseError`."""
    try:
        return X25519PublicKey.from_public_bytes(unb64(text, 32, "wrap public key"))
    except (BundleEncryptionError, ValueError) as exc:
        raise MisuseError(f"not an X25519 public key: {exc}") from None


class WrappedKey(StrictStruct, frozen=True, kw_only=True):
    """The content key of one sealed bundle, wrapped for one device's X25519 key."""

    device_id: Annotated[str, Meta(min_length=1, max_length=128)]
    key_id: Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]
    ephemeral: _B64_32
    wrapped: Annotated[str, Meta(min_length=64, max_length=64)]  # 32-byte key + 16-byte tag


class WrappedKeys(StrictStruct, frozen=True, kw_only=True):
    """The recipients document: who can open the sealed file `bundle_sha256`."""

    schema: Literal["edgefleet-wrapped-keys/1"] = "edgefleet-wrapped-keys/1"
    bundle_id: Annotated[str, Meta(min_length=1, max_length=200)]
    bundle_sha256: _Hex64
    recipients: Annotated[list[WrappedKey], Meta(max_length=MAX_RECIPIENTS)]

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def _aad(bundle_sha256: str, device_id: str) -> bytes:
    return WRAP_INFO + b"|" + bundle_sha256.encode() + b"|" + device_id.encode()


def _kek(shared: bytes, ephemeral_raw: bytes, recipient_raw: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral_raw + recipient_raw,
                info=WRAP_INFO).derive(shared)


def wrap_content_key(content_key: bytes, recipient: X25519PublicKey, device_id: str,
                     bundle_sha256: str) -> WrappedKey:
    """Wrap `content_key` for `device_id`'s public key, bound to the sealed file's sha256."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = public_key_raw(ephemeral.public_key())
    recipient_raw = public_key_raw(recipient)
    kek = _kek(ephemeral.exchange(recipient), ephemeral_raw, recipient_raw)
    wrapped = AESGCM(kek).encrypt(_ZERO_NONCE, content_key, _aad(bundle_sha256, device_id))
    return WrappedKey(device_id=device_id, key_id=key_id(recipient_raw), ephemeral=b64(ephemeral_raw),
                      wrapped=b64(wrapped))


def parse_wrapped_keys(data: bytes, bundle_sha256: str) -> WrappedKeys:
    """Validate a recipients document; it must name the sealed file `bundle_sha256`."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise BundleEncryptionError(f"recipients document is over {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = WrappedKeys.model_validate_json(data)
    except ValidationError as exc:
        raise BundleEncryptionError(f"recipients document is invalid: {describe(exc)}") from None
    if doc.bundle_sha256 != bundle_sha256.removeprefix("sha256:").lower():
        raise BundleEncryptionError("recipients document is for another sealed bundle")
    return doc


def unwrap_content_key(doc: WrappedKeys, private: X25519PrivateKey, device_id: str) -> bytes:
    """This device's content key from `doc`.

    Raises `BundleNotForThisDeviceError` (no entry for this device and key: another cohort) and
    `BundleEncryptionError` (the entry does not open: made for another bundle or device).
    """
    own_raw = public_key_raw(private.public_key())
    own_id = key_id(own_raw)
    mine = [r for r in doc.recipients if r.device_id == device_id]
    if not mine:
        raise BundleNotForThisDeviceError(
            f"bundle {doc.bundle_id} is encrypted for {len(doc.recipients)} other device(s), "
            f"not for {device_id}: this device is outside its cohort")
    entry = next((r for r in mine if r.key_id == own_id), None)
    if entry is None:
        raise BundleNotForThisDeviceError(
            f"bundle {doc.bundle_id} is wrapped for another key of {device_id} (key {own_id} has none)")
    ephemeral_raw = unb64(entry.ephemeral, 32, "ephemeral key")
    try:
        ephemeral = X25519PublicKey.from_public_bytes(ephemeral_raw)
        kek = _kek(private.exchange(ephemeral), ephemeral_raw, own_raw)
        return AESGCM(kek).decrypt(_ZERO_NONCE, unb64(entry.wrapped, 48, "wrapped key"),
                                   _aad(doc.bundle_sha256, device_id))
    except (InvalidTag, ValueError):
        raise BundleEncryptionError(
            f"the content key wrapped for {device_id} does not open (made for another bundle or device)"
        ) from None
