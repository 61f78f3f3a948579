"""Bundle encryption on the fleet: seal a built bundle, publish the ciphertext, wrap its key for a cohort.

`publish_sealed` checks the plain bundle exactly as `publish_bundle` does, encrypts it
(`agent.contract.sealed`, a fresh content key) into a scratch file and publishes only that
ciphertext as the version's TUF target: the plaintext never enters the repository. The content
key is kept 0600 under `content_keys_dir` (beside the signing keys), so that
`wrap_for_cohort` can later wrap it for the devices a selector matches *now* and publish the
recipients document (`agent.contract.envelope`) as a TUF target of its own. Adding a device to
the cohort is one more wrapped key; the sealed file and its TUF hash stay the same. A re-wrap
after a revocation drops the revoked device from the document but cannot take back what it
already decrypted: re-seal (a new version) for that (see docs/trust.md, "Bundle encryption").

Errors: FleetInputError (bad bundle or selector, target not sealed by this fleet, no device of
the cohort has a wrap key), NotFound/Conflict as `publish_bundle`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.contract.bundle import read_manifest
from agent.contract.envelope import WrappedKeys, parse_public_key, recipients_target, wrap_content_key
from agent.contract.sealed import DEFAULT_CHUNK_BYTES, SCHEME, SealedHeader, new_content_key, seal_stream
from agent.errors import EdgefleetError
from agent.logs import log_event
from fleet.devices.selector import parse_selector
from fleet.devices.wrap_keys import for_devices
from fleet.errors import FleetInputError
from fleet.registry.publish import REPO_LOCK, publish_bundle
from fleet.registry.versions import ModelVersion
from fleet.store import Store
from fleet.trust.keys import atomic_write
from fleet.trust.repository import Repository, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrapResult:
    """What one (re-)wrap published."""

    bundle_target: str
    recipients_target: str
    bundle_sha256: str
    selector: str
    devices: list[str] = field(default_factory=list)  # wrapped for
    without_key: list[str] = field(default_factory=list)  # matched, but enrolled without a wrap key

    def to_dict(self) -> dict[str, Any]:
        return {"bundle_target": self.bundle_target, "recipients_target": self.recipients_target,
                "bundle_sha256": self.bundle_sha256, "selector": self.selector,
                "devices": list(self.devices), "without_key": list(self.without_key)}


def seal_bundle(plain: Path, out: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[SealedHeader, bytes]:
    """Encrypt the plain bundle `plain` into `out` (atomically) with a new content key."""
    manifest = read_manifest(plain)
    key = new_content_key()
    size = Path(plain).stat().st_size
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with open(plain, "rb") as src, os.fdopen(fd, "wb") as dst:
            header = seal_stream(src, dst, bundle_id=manifest.bundle_id, plaintext_bytes=size, key=key,
                                 chunk_bytes=chunk_bytes)
            dst.flush()
            os.fsync(dst.fileno())
        Path(tmp_name).replace(out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return header, key


def save_content_key(keys_dir: Path, sealed_sha256: str, key: bytes) -> None:
    if not keys_dir.is_dir():
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys_dir.chmod(0o700)
    atomic_write(keys_dir / f"{sealed_sha256}.key", key, mode=0o600)


def load_content_key(keys_dir: Path, sealed_sha256: str) -> bytes:
    try:
        return (keys_dir / f"{sealed_sha256}.key").read_bytes()
    except OSError:
        raise FleetInputError(f"no content key for sealed bundle {sealed_sha256[:12]}: "
                              "the target is not a bundle this fleet sealed") from None


def publish_sealed(store: Store, repo: Repository, keys_dir: Path, bundle: Path, model: str, actor: str,
                   selector: str, *, create_model: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   source: dict[str, Any] | None = None,
                   description: str | None = None) -> tuple[ModelVersion, WrapResult]:
    """Publish `bundle` encrypted, its content key wrapped for the devices `selector` matches."""
    parse_selector(selector)  # a bad selector is refused before anything is published
    with tempfile.TemporaryDirectory(prefix="efb-seal-") as scratch:
        sealed = Path(scratch) / "sealed.efb"
        try:
            _, key = seal_bundle(Path(bundle), sealed, chunk_bytes)
        except EdgefleetError as exc:
            raise FleetInputError(f"bundle {Path(bundle).name} is not valid: {exc}") from None
        sha = sha256_file(sealed)
        save_content_key(keys_dir, sha, key)
        try:
            version = publish_bundle(store, repo, Path(bundle), model, actor, create_model, source=source,
                                     description=description, published=sealed)
        except BaseException:  # nothing was published: no key to keep
            (keys_dir / f"{sha}.key").unlink(missing_ok=True)
            raise
    assert version.bundle_target is not None
    return version, wrap_for_cohort(store, repo, keys_dir, version.bundle_target, selector, actor)


def wrap_for_cohort(store: Store, repo: Repository, keys_dir: Path, bundle_target: str, selector: str,
                    actor: str) -> WrapResult:
    """(Re-)publish the recipients document of a sealed target for the devices `selector` matches now.

    Revoked devices and devices enrolled without a wrap key are left out. Audited.
    """
    sel = parse_selector(selector)
    ref = repo.target_ref(bundle_target)
    key = load_content_key(keys_dir, ref.sha256)
    matched = store.devices.ids_matching(sel)
    keys = for_devices(store, matched)
    if not keys:
        raise FleetInputError(f"no device matching {selector!r} has a wrap key: nobody could open the bundle")
    wrapped = [wrap_content_key(key, parse_public_key(k.public_key), k.device_id, ref.sha256) for k in keys]
    doc = WrappedKeys(bundle_id=f"{ref.name}-{ref.version}", bundle_sha256=ref.sha256, recipients=wrapped)
    result = WrapResult(bundle_target, recipients_target(ref.sha256), ref.sha256, str(sel),
                        [k.device_id for k in keys], sorted(set(matched) - {k.device_id for k in keys}))
    with tempfile.TemporaryDirectory(prefix="efb-wrap-") as scratch:
        path = Path(scratch) / "recipients.json"
        path.write_bytes(doc.to_json())
        with REPO_LOCK:
            repo.add_target(path, result.recipients_target, {"sealed": ref.path, "scheme": SCHEME})
    store.audit.record(actor, "bundle.wrap", f"targets/{bundle_target}", None, result.to_dict())
    log_event(log, "bundle.wrapped", target=bundle_target, devices=len(result.devices),
              without_key=len(result.without_key))
    return result
