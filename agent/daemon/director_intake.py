"""Director documents on their way from MQTT to the lifecycle.

Every document is verified by the `DirectorGate` (signature against the director keys in the
trusted TUF root, per-addressee sequence, expiry, addressee) before the `Lifecycle` sees it;
a refused one is reported as an event and changes nothing. A document signed only by keys
the trusted root does not know may come from rotated director keys: it is kept and checked
once more after a TUF refresh, done on the lifecycle's thread (`retry_deferred`, from the
daemon's heartbeat), never on the MQTT network thread that the fetcher needs.

Kept apart from `agent.daemon.core` so the daemon module stays about wiring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.daemon.director_gate import DirectorGate
from agent.errors import (
    EdgefleetError,
    MisuseError,
    TransportError,
    UnknownDirectorKeyError,
    UntrustedDataError,
)
from agent.lifecycle import Lifecycle
from agent.logs import log_event
from agent.transport import Message

log = logging.getLogger("edgefleet.agent")

#: At most one TUF refresh per this many seconds for documents signed by unknown keys.
TRUST_REFRESH_MIN_S = 5.0


class _Refreshable(Protocol):
    def refresh(self) -> None: ...


class _DocumentSink(Protocol):
    def on_document(self, payload: bytes, last_sequence: int) -> None: ...


class DirectorIntake:
    """Verifies director documents and hands accepted targets to the lifecycle.

    `event(kind, **fields)` stores and sends a lifecycle event (the daemon's outbox);
    `collection` sees every accepted document (data-collection policies ride on them).
    """

    def __init__(self, gate: DirectorGate, lifecycle: Lifecycle, trust: _Refreshable,
                 collection: _DocumentSink, event: Callable[..., None]) -> None:
        self.gate, self.lifecycle, self.trust = gate, lifecycle, trust
        self.collection, self._event = collection, event
        self._lock = threading.Lock()
        self._deferred: dict[str, bytes] = {}  # addressee -> document signed by unknown keys
        self._last_refresh = -TRUST_REFRESH_MIN_S

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def handler(self, addressee: str) -> Callable[[Message], None]:
        """The MQTT handler of one desired topic (`device:ID` or `cohort:NAME`)."""

        def handle(msg: Message) -> None:
            if msg.payload:  # (an empty payload is a cleared retained topic)
                self.consider(addressee, msg.payload, may_defer=True)

        return handle

    def consider(self, addressee: str, payload: bytes, may_defer: bool) -> None:
        """Verify one director document and hand an accepted one to the lifecycle."""
        try:
            target = self.gate.accept(addressee, payload, self.lifecycle.record.director_sequence)
        except UntrustedDataError as exc:  # DirectorError, or a trusted root that no longer parses
            if may_defer and isinstance(exc, UnknownDirectorKeyError):
                log_event(log, "agent.director_deferred", addressee=addressee, error=str(exc))
                with self._lock:
                    self._deferred[addressee] = payload
                self.lifecycle.ctx.wake.set()
                return
            log_event(log, "agent.director_refused", logging.WARNING, addressee=addressee, error=str(exc))
            self._event("director_refused", reason=str(exc))
            return
        except MisuseError as exc:
            log_event(log, "agent.director_ledger_failed", logging.ERROR, error=str(exc))
            return
        if target is not None:
            self.collection.on_document(payload, self.gate.entries[addressee].sequence - 1)
            fields: dict[str, Any] = {"measurements": {"local_sequence": float(target.sequence)}}
            self._event("director_accepted", bundle_id=target.bundle_id, **fields)
            self.lifecycle.offer_desired(target)

    def retry_deferred(self) -> None:
        """Refresh TUF metadata (a root rotation may bring new director keys), then re-check."""
        if time.monotonic() - self._last_refresh < TRUST_REFRESH_MIN_S:
            return  # bounded: documents signed by strangers must not make us refresh in a loop
        with self._lock:
            deferred, self._deferred = self._deferred, {}
        if not deferred:
            return
        self._last_refresh = time.monotonic()
        try:
            self.trust.refresh()
        except EdgefleetError as exc:
            log_event(log, "agent.trust_refresh_failed", logging.WARNING, error=str(exc))
            if isinstance(exc, TransportError):  # offline: try again on a later heartbeat
                with self._lock:
                    self._deferred = {**deferred, **self._deferred}
                return
        for addressee, payload in deferred.items():
            self.consider(addressee, payload, may_defer=False)
