"""One load device: its bundle, director sequence, outbox and the reactions to a document.

Pure of I/O: `on_director(data, now)` and `due(now)` return the messages to publish; the loop
(`simulators.load_devices.loop`) sends them and calls `acked(seq)` when the broker's PUBACK
arrives. Every message carries its place in the outbox, so a reconnect resends what was not
acknowledged, with the same `seq` (events) or as the current snapshot (reported state).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from agent.contract.director import DirectorDocument
from agent.contract.protocol import Event, ReportedState, Topics, encode_event, encode_reported
from agent.contract.telemetry import TelemetryReport
from agent.contract.telemetry_codec import encode_report

#: Reported states an agent walks through while installing (what the controller folds).
INSTALL_STATES = ("downloading", "verifying", "staged", "activating", "probation")


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False
    seq: int | None = None  # outbox key (events, telemetry); None: reported snapshot


@dataclass
class LoadDevice:
    """A device that follows director documents without running anything."""

    device_id: str
    topics: Topics
    active: str | None
    install_s: float = 0.2
    cohorts: tuple[str, ...] = ()
    previous: str | None = None
    state: str = "idle"
    last_sequence: int = 0
    next_seq: int = 0
    outbox: dict[int, Outgoing] = field(default_factory=dict)
    pending_target: str | None = None
    commit_at: float | None = None
    applied: list[str] = field(default_factory=list)  # bundles committed, in order
    refused: int = 0

    def reported(self, now: float, online: bool = True) -> Outgoing:
        state = ReportedState(device_id=self.device_id, agent_version="load-device", state=self.state,
                              active_bundle=self.active, previous_bundle=self.previous,
                              director_sequence=self.last_sequence or None, online=online, timestamp=now)
        return Outgoing(self.topics.reported(self.device_id), encode_reported(state), retain=True)

    def _event(self, kind: str, bundle: str | None, now: float, reason: str = "") -> Outgoing:
        seq = self.next_seq
        self.next_seq += 1
        ev = Event(device_id=self.device_id, type=kind, bundle_id=bundle, previous_bundle_id=self.active,
                   reason=reason, timestamp=now, seq=seq)
        out = Outgoing(self.topics.events(self.device_id), encode_event(ev), seq=seq)
        self.outbox[seq] = out
        return out

    def telemetry(self, template: TelemetryReport, now: float, interval_s: float) -> Outgoing:
        seq = self.next_seq
        self.next_seq += 1
        report = dataclasses.replace(template, device_id=self.device_id, seq=seq,
                                     interval_start=now - interval_s, interval_end=now)
        out = Outgoing(self.topics.telemetry(self.device_id), encode_report(report), seq=seq)
        self.outbox[seq] = out
        return out

    def acked(self, seq: int) -> None:
        self.outbox.pop(seq, None)

    def on_director(self, data: bytes, now: float) -> list[Outgoing]:
        """Parse a director envelope (signatures are not checked: a load device) and start
        installing its target; a stale, foreign or malformed document is refused (counted)."""
        try:
            doc = DirectorDocument.model_validate(json.loads(data)["signed"])
        except (ValueError, KeyError, TypeError):
            self.refused += 1
            return []
        addressed = doc.device_id == self.device_id or (doc.cohort is not None and doc.cohort in self.cohorts)
        if not addressed or doc.sequence <= self.last_sequence:
            self.refused += 1
            return []
        self.last_sequence = doc.sequence
        target = f"{doc.target.name}-{doc.target.version}"
        out = [self._event("director_accepted", target, now)]
        if target == self.active:
            self.state = "idle"
            return [*out, self.reported(now)]
        self.pending_target, self.commit_at = target, now + self.install_s
        self.state = INSTALL_STATES[0]
        return [*out, self.reported(now)]

    def due(self, now: float) -> list[Outgoing]:
        """The install finishing: probation, then committed on the new bundle."""
        if self.commit_at is None or now < self.commit_at or self.pending_target is None:
            return []
        target = self.pending_target
        self.state = "probation"
        out = [self.reported(now)]
        committed = self._event("committed", target, now)
        self.previous, self.active = self.active, target
        self.state, self.pending_target, self.commit_at = "idle", None, None
        self.applied.append(target)
        return [*out, committed, self.reported(now)]
