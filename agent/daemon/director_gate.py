"""Accepting director documents: verification plus a durable per-addressee ledger.

Why a ledger beside the state record: the fleet numbers director documents per *addressee*
(`fleet.trust.director_signer.DirectorSigner` keeps one sequence for `device:<id>` and one per
`cohort:<name>`), while the lifecycle needs one strictly increasing "desired" counter to
order targets and to tie quarantines to "until a newer document". So each addressee's last
accepted sequence (and the digest of that document) is kept here, and every accepted
document gets the next *local* acceptance number, which is what the lifecycle sees as
`DesiredTarget.sequence` (and what the state record's `director_sequence` counts).

A retained document is delivered again on every (re)connect and QoS 1 may duplicate it: the
same bytes as the last accepted one are a duplicate (silently ignored, or handed over again
if the lifecycle never saw it because the agent died in between), anything older or equal
with different bytes is a replay and refused.

Errors: `DirectorGate.accept` raises `agent.errors.DirectorError` (refuse and report; nothing
changed; `UnknownDirectorKeyError` when no signature is by a key the trusted root knows) and
`MisuseError` when the ledger cannot be written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.contract.director import DirectorDocument, DirectorTrust, verify_director
from agent.durable_io import write_durably
from agent.errors import DirectorError, MisuseError
from agent.lifecycle.state_store import DesiredTarget
from agent.logs import log_event

log = logging.getLogger(__name__)
MAX_LEDGER_BYTES = 256 * 1024


@dataclass(frozen=True)
class LedgerEntry:
    """The last document accepted from one addressee."""

    sequence: int  # the fleet's sequence for this addressee
    digest: str  # sha256 of the exact bytes accepted
    local: int  # the acceptance number handed to the lifecycle


def addressee_of(doc: DirectorDocument) -> str:
    """`device:<id>` or `cohort:<name>`: the fleet's sequence space the document belongs to."""
    return f"device:{doc.device_id}" if doc.device_id is not None else f"cohort:{doc.cohort}"


def desired_from(doc: DirectorDocument, local: int) -> DesiredTarget:
    """The lifecycle's view of an accepted document, numbered with the local acceptance number."""
    base = DesiredTarget.from_director(doc)

    def renumber(t: DesiredTarget | None) -> DesiredTarget | None:
        if t is None:
            return None
        return DesiredTarget(local, t.path, t.length, t.sha256, t.name, t.version)

    return DesiredTarget(
        local, base.path, base.length, base.sha256, base.name, base.version, shadow=renumber(base.shadow),
        delta=base.delta,

        windows=base.windows,
    )


class DirectorGate:
    """Verify untrusted director bytes for this device and number the accepted ones."""

    def __init__(
        self,
        ledger_path: Path,
        device_id: str,
        cohorts: Collection[str],
        trust: Callable[[], DirectorTrust],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = Path(ledger_path)
        self.device_id = device_id
        self.cohorts = frozenset(cohorts)
        self._trust = trust
        self.clock = clock  # judges expiry; public so a host can skew it (the swarm's clock faults)
        self._lock = threading.Lock()
        self.entries, self.local = self._load()

    def _load(self) -> tuple[dict[str, LedgerEntry], int]:
        if not self.path.exists():
            return {}, 0
        try:
            if self.path.stat().st_size > MAX_LEDGER_BYTES:
                raise ValueError("ledger larger than any real one")
            doc: Any = json.loads(self.path.read_bytes())
            entries = {
                k: LedgerEntry(int(v["sequence"]), str(v["digest"]), int(v["local"]))
                for k, v in doc["entries"].items()
            }
            return entries, int(doc["local"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Losing the ledger only loses replay protection per addressee until the next
            # document; the lifecycle still refuses anything not newer than its record.
            log_event(log, "director.ledger_corrupt", logging.WARNING, file=str(self.path), error=str(exc))
            return {}, 0

    def _save(self) -> None:
        data = json.dumps(
            {"local": self.local, "entries": {k: e.__dict__ for k, e in sorted(self.entries.items())}},
            sort_keys=True,
        ).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_durably(self.path, data)  # the directory too: a power cut must not undo it
        except OSError as exc:
            raise MisuseError(f"cannot write director ledger {self.path}: {exc}") from exc

    def accept(self, topic_addressee: str, data: bytes, lifecycle_sequence: int) -> DesiredTarget | None:
        """Verify `data` that arrived on `topic_addressee`'s desired topic.

        Returns the target to hand to the lifecycle, or None for a duplicate it already has.
        `lifecycle_sequence` is the state record's `director_sequence` (local numbering).
        Raises `DirectorError` (bad signature, replay, expired, foreign, wrong topic), or its
        subclass `UnknownDirectorKeyError` when only keys unknown to the trusted root signed.
        """
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            entry = self.entries.get(topic_addressee)
            if entry is not None and entry.digest == digest:
                if entry.local <= lifecycle_sequence:
                    return None  # a retained or duplicated copy of what we already run
                # accepted but never reached the lifecycle (the agent died in between)
                doc = self._verify(data, entry.sequence - 1, topic_addressee)
                return desired_from(doc, entry.local)
            doc = self._verify(data, entry.sequence if entry else 0, topic_addressee)
            local = max(self.local, lifecycle_sequence) + 1
            self.entries[topic_addressee] = LedgerEntry(doc.sequence, digest, local)
            self.local = local
            self._save()
        log_event(
            log,
            "director.accepted",
            addressee=topic_addressee,
            sequence=doc.sequence,
            local=local,
            target=doc.target.path,
        )
        return desired_from(doc, local)

    def _verify(self, data: bytes, last_sequence: int, topic_addressee: str) -> DirectorDocument:
        doc = verify_director(data, self._trust(), self.device_id, self.cohorts, last_sequence, self.clock())
        if addressee_of(doc) != topic_addressee:
            raise DirectorError(
                f"director document for {addressee_of(doc)} arrived on the desired topic of {topic_addressee}"
            )
        return doc
