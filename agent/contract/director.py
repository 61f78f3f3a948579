"""Director documents: which TUF target a device (or cohort) should run (Uptane's director idea).

TUF proves that a bundle is genuine and current; it does not say which bundle *this* device
should run. A director document does: it is signed by the fleet's online director key(s),
carries a strictly increasing sequence number (so a replayed old order is refused), an expiry
(so a frozen order dies), and its addressee (so an order for another device is refused).
The director's keys reach the device inside the TUF root (`x-edgefleet-director`), so they are
signed by the offline root keys and rotated by a root rotation.

Wire format: `{"signed": {...}, "signatures": [{"keyid": ..., "sig": ...}]}`; signatures are
over the canonical JSON (securesystemslib `encode_canonical`) of `signed`, the same encoding TUF
metadata uses. Everything here is pure: bytes + trusted state + a clock in, a model or an error out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from agent.contract.collect import CollectPolicy
from agent.contract.strict import Meta, StrictStruct, ValidationError, describe, utc_timestamp
from agent.contract.windows import UpdateWindows
from agent.errors import DirectorError, UnknownDirectorKeyError

# securesystemslib is imported where keys and signatures are handled, not here: its signer
# module loads cryptography (~8.5 MB RSS), which an idle agent that has already applied its
# retained director document never needs.
if TYPE_CHECKING:
    from securesystemslib.signer import Key, Signer
    from tuf.api.metadata import Root

DIRECTOR_SCHEMA_VERSION = 1
#: Field of the TUF root's signed part that carries the director's keys and threshold.
ROOT_DIRECTOR_FIELD = "x-edgefleet-director"
#: Largest director document accepted (a real one is well under 4 KiB).
MAX_DIRECTOR_BYTES = 64 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ADDRESSEE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class TargetRef(StrictStruct, frozen=True, kw_only=True):
    """A TUF target the device should install: path, signed length and sha256, plus labels."""

    path: Annotated[str, Meta(min_length=1, max_length=512)]
    length: Annotated[int, Meta(ge=1)]
    sha256: str
    name: Annotated[str, Meta(max_length=128)] = ""
    version: Annotated[str, Meta(max_length=64)] = ""

    def _check(self) -> None:
        if not _HEX64.fullmatch(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if self.path.startswith("/") or ".." in self.path.split("/") or "\\" in self.path:
            raise ValueError("target path must be relative, without '..' or backslashes")


class DeltaRef(StrictStruct, frozen=True, kw_only=True):
    """A delta target that rebuilds `DirectorDocument.target` from the bundle `base_bundle`.

    Optional and advisory: the agent may use it when its active bundle is `base_bundle`, and
    accepts the result only if it equals the full target's signed length and sha256
    (`agent.contract.delta`). The fleet names one only for agents that report the `delta`
    feature, so an older agent (which refuses unknown fields) never sees it.
    """

    path: Annotated[str, Meta(min_length=1, max_length=512)]
    length: Annotated[int, Meta(ge=1)]
    sha256: str
    base_bundle: Annotated[str, Meta(min_length=1, max_length=200)]
    base_sha256: str
    format: Literal["tensor-diff", "zstd-patch"]

    def _check(self) -> None:
        if not (_HEX64.fullmatch(self.sha256) and _HEX64.fullmatch(self.base_sha256)):
            raise ValueError("sha256 and base_sha256 must be 64 lowercase hex digits")
        if self.path.startswith("/") or ".." in self.path.split("/") or "\\" in self.path:
            raise ValueError("delta path must be relative, without '..' or backslashes")

    def as_target(self) -> TargetRef:
        """The reference TUF checks the delta file against."""
        return TargetRef(path=self.path, length=self.length, sha256=self.sha256)


class DirectorDocument(StrictStruct, frozen=True, kw_only=True):
    """The signed part of a director document (see docs/trust.md)."""

    schema_version: Literal[1] = 1
    device_id: str | None = None
    cohort: str | None = None
    sequence: Annotated[int, Meta(ge=1)]
    issued_at: datetime
    expires: datetime
    target: TargetRef
    shadow: TargetRef | None = None
    delta: DeltaRef | None = None
    rollout_id: Annotated[str, Meta(max_length=128)] | None = None
    reason: Annotated[str, Meta(max_length=1024)] = ""
    collect: CollectPolicy | None = None  # opt-in data collection (agent.contract.collect); signed

    # When the device may download and activate (agent/contract/windows.py); absent = any time.
    # Only documents of rollouts with windows carry it, so older agents keep taking the rest.
    windows: UpdateWindows | None = None

    def _check(self) -> None:
        for addressee in (self.device_id, self.cohort):
            if addressee is not None and not _ADDRESSEE.fullmatch(addressee):
                raise ValueError("addressee must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
        self._normalise("issued_at", utc_timestamp(self.issued_at))
        self._normalise("expires", utc_timestamp(self.expires))
        if (self.device_id is None) == (self.cohort is None):
            raise ValueError("exactly one of device_id or cohort must be set")
        if self.expires <= self.issued_at:
            raise ValueError("expires must be after issued_at")

    def to_signed_dict(self) -> dict[str, Any]:
        """JSON-ready dict with `Z` timestamps and no nulls (canonical JSON has no floats)."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["issued_at"] = _iso(self.issued_at)
        data["expires"] = _iso(self.expires)
        return data


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class DirectorTrust:
    """The director's public keys and signature threshold, as delivered by the trusted TUF root."""

    keys: dict[str, Key] = field(default_factory=dict)
    threshold: int = 1

    @classmethod
    def from_dict(cls, data: Any) -> DirectorTrust:
        """Parse `{"keys": {keyid: key}, "threshold": n}`. Raises `DirectorError` if malformed."""
        from securesystemslib.signer import Key

        try:
            keys = {keyid: Key.from_dict(keyid, dict(kd)) for keyid, kd in data["keys"].items()}
            threshold = int(data["threshold"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DirectorError(f"malformed director trust anchor: {exc!r}") from None
        if threshold < 1 or threshold > len(keys):
            raise DirectorError(f"director threshold {threshold} is not within 1..{len(keys)} keys")
        return cls(keys=keys, threshold=threshold)

    @classmethod
    def from_root(cls, root: Root) -> DirectorTrust:
        """Read the anchor from a verified TUF root's `x-edgefleet-director` field.

        Raises `DirectorError` if the root carries no (or a malformed) director anchor.
        """
        data = root.unrecognized_fields.get(ROOT_DIRECTOR_FIELD)
        if data is None:
            raise DirectorError(f"trusted root has no {ROOT_DIRECTOR_FIELD!r} field: no director keys")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The form stored in the root (keys in securesystemslib's dict format)."""
        return {"keys": {k: key.to_dict() for k, key in self.keys.items()}, "threshold": self.threshold}


def canonical_bytes(signed: dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no whitespace) of `signed`: what signatures cover."""
    from securesystemslib.formats import encode_canonical

    encoded = encode_canonical(signed)
    assert encoded is not None  # only None when writing to an output function
    return encoded.encode()


def sign_director(doc: DirectorDocument, signers: Sequence[Signer]) -> bytes:
    """Sign `doc` with every signer and return the envelope bytes (raises `DirectorError` if none)."""
    if not signers:
        raise DirectorError("no director signer given")
    signed = doc.to_signed_dict()
    payload = canonical_bytes(signed)
    sigs = [s.sign(payload).to_dict() for s in signers]
    return json.dumps({"signed": signed, "signatures": sigs}, sort_keys=True, separators=(",", ":")).encode()


def verify_director(
    data: bytes,
    trust: DirectorTrust,
    device_id: str,
    cohorts: Collection[str],
    last_sequence: int,
    now: datetime,
) -> DirectorDocument:
    """Verify an untrusted director envelope for `device_id` and return its document.

    Checks, in order: size, JSON and schema, signatures (unknown keys ignored, a bad signature by
    a trusted key refused, threshold of distinct trusted keys), sequence strictly greater than
    `last_sequence`, expiry against `now`, addressee (this device or one of `cohorts`).
    Raises `DirectorError` naming the failed check; the caller's state must not change then.
    Signatures only by keys `trust` does not know raise its subclass `UnknownDirectorKeyError`
    (the trusted root may be behind a director key rotation).
    """
    if len(data) > MAX_DIRECTOR_BYTES:
        raise DirectorError(f"director document is {len(data)} bytes, over the {MAX_DIRECTOR_BYTES} limit")
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DirectorError(f"director document is not JSON: {exc}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"signed", "signatures"}:
        raise DirectorError("director envelope must be an object with exactly 'signed' and 'signatures'")
    signed, raw_sigs = envelope["signed"], envelope["signatures"]
    if not isinstance(signed, dict) or not isinstance(raw_sigs, list):
        raise DirectorError("director envelope: 'signed' must be an object and 'signatures' a list")
    try:
        doc = DirectorDocument.model_validate(signed)
    except ValidationError as exc:
        raise DirectorError(f"invalid director document: {describe(exc)}") from None

    _check_signatures(signed, raw_sigs, trust)
    if doc.sequence <= last_sequence:
        raise DirectorError(
            f"director document replayed or stale: sequence {doc.sequence} is not greater than "
            f"the last accepted {last_sequence}"
        )
    if now.tzinfo is None:
        raise DirectorError("verification clock must be timezone-aware")
    if doc.expires <= now:
        raise DirectorError(f"director document expired at {_iso(doc.expires)} (now {_iso(now)})")
    if doc.device_id is not None and doc.device_id != device_id:
        raise DirectorError(f"director document is addressed to device {doc.device_id!r}, not {device_id!r}")
    if doc.cohort is not None and doc.cohort not in cohorts:
        raise DirectorError(f"director document is addressed to cohort {doc.cohort!r}, not one of ours")
    return doc


def _check_signatures(signed: dict[str, Any], raw_sigs: list[Any], trust: DirectorTrust) -> None:
    from securesystemslib.exceptions import UnverifiedSignatureError
    from securesystemslib.signer import Signature

    payload = canonical_bytes(signed)
    valid: set[str] = set()
    unknown: list[str] = []
    for raw in raw_sigs:
        try:
            sig = Signature.from_dict(dict(raw))
        except (KeyError, TypeError, ValueError) as exc:
            raise DirectorError(f"malformed director signature: {exc!r}") from None
        key = trust.keys.get(sig.keyid)
        if key is None:
            unknown.append(sig.keyid[:12])
            continue
        try:
            key.verify_signature(sig, payload)
        except UnverifiedSignatureError:
            raise DirectorError(
                f"bad director signature by trusted key {sig.keyid[:12]}: document was modified"
            ) from None
        valid.add(sig.keyid)
    if not valid and unknown:
        raise UnknownDirectorKeyError(f"director document signed only by unknown key(s) {', '.join(unknown)}")
    if len(valid) < trust.threshold:
        raise DirectorError(
            f"director document has {len(valid)} valid signature(s), below the threshold {trust.threshold}"
        )
