"""Fetching an update as a delta against the active bundle, falling back to the full bundle.

Why its own module: the download handler stays one decision ("delta, else full"), and every
way a delta can fail (not offered for our base, missing, tampered, for another base, rebuilding
the wrong bytes) ends the same way: the reason is reported and the full, TUF-verified bundle is
fetched instead. A delta changes nothing in the slots: the base is re-created from the active
slot in a scratch file, the result is written beside it and accepted only when it equals the
full target's signed length and sha256 (`agent.contract.delta.apply_delta`); the normal
`verifying` step then checks it once more while extracting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from agent.contract.bundle import rebuild_bundle
from agent.contract.bundle_checks import MANIFEST_NAME
from agent.contract.delta import apply_delta
from agent.contract.director import TargetRef
from agent.errors import EdgefleetError, MisuseError
from agent.lifecycle.decrypt import is_sealed_slot
from agent.lifecycle.slots import SLOT_FILE, Slots
from agent.lifecycle.state_store import DesiredTarget
from agent.logs import log_event

log = logging.getLogger(__name__)


@runtime_checkable
class DeltaTrustSource(Protocol):
    """`agent.trust.client.TrustClient.download_delta`."""

    def download_delta(self, delta: TargetRef, full: TargetRef) -> Path: ...


@dataclass(frozen=True)
class DeltaOutcome:
    """What one delta attempt gave: the rebuilt bundle, or why the full bundle is needed."""

    path: Path | None
    reason: str = ""
    fetched_bytes: int = 0
    rebuild_ms: float = 0.0


def _slot_manifest_bytes(slots: Slots, bundle_id: str) -> bytes:
    """The exact manifest bytes the slot was extracted from (what the bundle archive held)."""
    root = slots.path(bundle_id)
    doc = json.loads((root / SLOT_FILE).read_text())
    if "manifest_path" not in doc:
        raise MisuseError(f"slot {bundle_id!r} keeps no manifest file: cannot re-create its bundle")
    path = (root / doc["manifest_path"]).resolve()
    if not path.is_relative_to(root.resolve()) or path.name != MANIFEST_NAME:
        raise MisuseError(f"slot {bundle_id!r}: manifest path outside the slot")
    return path.read_bytes()


def fetch_by_delta(
    trust: object, slots: Slots, active: str | None, d: DesiredTarget, full: TargetRef
) -> DeltaOutcome | None:
    """Try the director's delta for `d`; None when none applies (no delta, other base, old trust).

    Returns a `DeltaOutcome` with the rebuilt bundle in `slots.downloads`, or with `path=None`
    and the reason the delta was refused (the caller falls back to the full bundle).
    """
    delta = d.delta
    if delta is None or not isinstance(trust, DeltaTrustSource):
        return None
    if active is None or delta.base_bundle != active or not slots.has(active):
        return None
    if is_sealed_slot(slots.path(active)):  # its plaintext is never rebuilt outside the slot
        return None
    ref = TargetRef(path=delta.path, length=delta.length, sha256=delta.sha256)
    base = slots.downloads / f".base-{d.bundle_id}.efb"
    out = slots.downloads / f"{d.sha256}.delta-rebuilt.efb"
    try:
        t0 = time.perf_counter()
        delta_file = trust.download_delta(ref, full)
        base.unlink(missing_ok=True)
        slot = slots.open(active)
        try:
            manifest = _slot_manifest_bytes(slots, active)
            rebuild_bundle(manifest, slot.model_path, slot.manifest.model_file, base)
            out.unlink(missing_ok=True)
            apply_delta(base, delta_file, out, expected_sha256=d.sha256, expected_length=d.length)
        except OSError as exc:
            raise MisuseError(f"cannot re-create the base bundle {active}: {exc}") from exc
        finally:
            base.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                delta_file.unlink()  # the TUF cache copy: the rebuilt bundle is what counts
        elapsed = (time.perf_counter() - t0) * 1000.0
    except (EdgefleetError, ValueError) as exc:
        reason = f"delta {delta.path} refused ({type(exc).__name__}): {exc}; fetching the full bundle"
        log_event(log, "lifecycle.delta_refused", logging.WARNING, bundle=d.bundle_id, reason=reason)
        return DeltaOutcome(None, reason)
    log_event(log, "lifecycle.delta_applied", bundle=d.bundle_id, base=active, fetched=delta.length)
    return DeltaOutcome(out, "", delta.length, round(elapsed, 3))

