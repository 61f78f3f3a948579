"""Installing a sealed (encrypted) bundle: unwrap this device's content key, decrypt into the slot.

`SealingExtractor` is the lifecycle's extractor (`LifecycleContext.extract`): a plain bundle
goes to `extract_bundle` as before; a sealed one (`agent.contract.sealed`) is

1. checked against the TUF-signed length (the sha256 is checked over every sealed byte while
   it is read, so the TUF hash covers the ciphertext),
2. opened with the content key wrapped for this device in the recipients document, itself a
   TUF target (`agent.contract.envelope.recipients_target`),
3. decrypted chunk by chunk straight into the extraction directory inside the slot's
   temporary directory: the plaintext exists nowhere else, and the same member checks and
   model digest as for a plain bundle run on it before the slot is renamed into place.

Every refusal is a `BundleEncryptionError` (a `BundleError`, so the lifecycle refuses and
quarantines the bundle: slots unchanged, `update_failed` reported); a device outside the
cohort gets `BundleNotForThisDeviceError` before anything is written. A recipients document
that cannot be fetched is a `MisuseError` here (the lifecycle fetches again with backoff).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from agent.contract.bundle import (
    DEFAULT_LIMITS,
    BundleLimits,
    ExtractedBundle,
    extract_bundle,
    extract_stream,
)
from agent.contract.director import TargetRef
from agent.contract.sealed import SealedReader, is_sealed, read_header
from agent.errors import (
    BundleEncryptionError,
    BundleNotForThisDeviceError,
    MisuseError,
    TransportError,
)
from agent.logs import log_event

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

log = logging.getLogger(__name__)
#: Written into a sealed bundle's extraction directory (so inside its slot): the slot's plaintext
#: must never be rebuilt into a bundle file elsewhere (`agent.lifecycle.delta_fetch` skips it).
SEALED_MARKER = "sealed.json"


def is_sealed_slot(slot_root: Path) -> bool:
    """Whether the slot at `slot_root` was installed from a sealed bundle."""
    return (slot_root / SEALED_MARKER).is_file() or any(slot_root.glob(f"*/{SEALED_MARKER}"))


class TargetSource(Protocol):
    """`agent.trust.client.TrustClient` (only the download)."""

    def download_target(self, target_path: str, expected: TargetRef | None = None) -> Path: ...


@dataclass
class SealingExtractor:
    """Extracts plain bundles as before and sealed ones for this device (see the module doc)."""

    trust: TargetSource
    device_id: str
    private_key: Callable[[], X25519PrivateKey]  # loaded per install: never held in memory idle
    limits: BundleLimits = DEFAULT_LIMITS

    def __call__(self, bundle: Path, dest: Path, *, expected_sha256: str | None = None,
                 expected_length: int | None = None) -> ExtractedBundle:
        try:
            with open(bundle, "rb") as f:
                head = f.read(8)
        except OSError as exc:
            raise MisuseError(f"cannot open bundle {bundle}: {exc.strerror}") from None
        if not is_sealed(head):
            return extract_bundle(bundle, dest, self.limits, expected_sha256=expected_sha256,
                                  expected_length=expected_length)
        return self.unseal(Path(bundle), Path(dest), expected_sha256, expected_length)

    def content_key(self, sealed_sha256: str, bundle_id: str) -> bytes:
        """This device's content key of the sealed file `sealed_sha256`, from its recipients."""
        from agent.contract import envelope  # lazy: cryptography's X25519 stays out of the idle daemon

        try:
            doc_path = self.trust.download_target(envelope.recipients_target(sealed_sha256))
            data = doc_path.read_bytes()
        except (TransportError, OSError) as exc:
            raise MisuseError(f"cannot fetch the recipients of {bundle_id}: {exc}") from exc
        doc = envelope.parse_wrapped_keys(data, sealed_sha256)
        if doc.bundle_id != bundle_id:
            raise BundleEncryptionError(f"recipients document names {doc.bundle_id}, the file {bundle_id}")
        try:
            private = self.private_key()
        except MisuseError as exc:  # no wrap key: this device can open no sealed bundle
            raise BundleNotForThisDeviceError(f"bundle {bundle_id} is encrypted and {exc}") from exc
        return envelope.unwrap_content_key(doc, private, self.device_id)

    def unseal(self, bundle: Path, dest: Path, expected_sha256: str | None,
               expected_length: int | None) -> ExtractedBundle:
        if expected_sha256 is None:
            raise BundleEncryptionError("a sealed bundle is installed only against its TUF-signed sha256")
        want = expected_sha256.removeprefix("sha256:").lower()
        with open(bundle, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            if expected_length is not None and size != expected_length:
                raise BundleEncryptionError(
                    f"sealed bundle is {size} bytes, the signed length {expected_length}")
            header, _ = read_header(raw)
            if header.sealed_bytes != size:
                raise BundleEncryptionError(
                    f"sealed bundle is {size} bytes, its header describes {header.sealed_bytes}")
            if header.plaintext_bytes > self.limits.max_bundle_bytes:
                raise BundleEncryptionError(f"sealed bundle holds {header.plaintext_bytes} bytes, over "
                                            f"the limit of {self.limits.max_bundle_bytes}")
            try:
                key = self.content_key(want, header.bundle_id)
            except BundleEncryptionError as exc:
                log_event(log, "bundle.sealed_refused", logging.WARNING, bundle=header.bundle_id,
                          error=type(exc).__name__, reason=str(exc))
                raise
            raw.seek(0)
            reader = SealedReader(raw, key)
            del key

            def check(_pos: int, _digest: str) -> None:
                reader.finish()
                if reader.hexdigest() != want:
                    raise BundleEncryptionError("sealed bundle sha256 disagrees with the signed hash")

            stream: BinaryIO = reader  # type: ignore[assignment]  # a forward-only RawIOBase
            out = extract_stream(stream, dest, self.limits, check=check, label=str(bundle))
        if out.manifest.bundle_id != header.bundle_id:
            raise BundleEncryptionError(f"sealed header names {header.bundle_id}, its manifest "
                                        f"{out.manifest.bundle_id}")
        (out.root / SEALED_MARKER).write_text(json.dumps({"sealed_sha256": want}))  # fsynced by the slot
        log_event(log, "bundle.unsealed", bundle=header.bundle_id, sha256=want)
        return ExtractedBundle(out.manifest, out.root, out.model_path, want, size)


def sealing_extractor(trust: TargetSource, device_id: str, state_dir: Path) -> SealingExtractor:
    """The daemon's extractor: this device's wrap key from `state_dir` (`agent.trust.wrap_key`)."""

    def private_key() -> X25519PrivateKey:
        from agent.trust.wrap_key import load_wrap_key  # lazy: cryptography, only for a sealed bundle

        return load_wrap_key(state_dir)

    return SealingExtractor(trust, device_id, private_key)
