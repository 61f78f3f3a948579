"""The fleet's check of signed device reports (issue 14), at the one seam device messages enter.

Every reported state reaches the fleet through the publisher's inbound thread
(`Publisher.inbound_check`), every event and telemetry report through its acked stream
(`fleet/delivery/acked_stream.py`), every dataset chunk through
the dataset ingest's worker (`fleet.collection.ingest`); this runs first and lets a message on
only when it carries an `efsig` signature (`agent.contract.report_auth`) by the key registered
for the device its topic names (`fleet.devices.report_keys`), over that topic kind and that
payload, with a counter not accepted before for that device and kind. So a neighbour with a
misconfigured ACL cannot report for another device (its key is not that device's), a broker
cannot alter or invent a report, and a replayed report is dropped; nothing is changed by a
refused message. Each accepted counter is claimed in the database (`fleet.devices.report_keys`:
a unique key, out-of-order arrival allowed), so several ingest workers refuse a replay whichever
of them gets it.

Refused messages are counted by kind and reason (`edgefleet_reports_refused_total`) and logged
with a rate limit (`fleet.delivery.malformed.MalformedLog`); reasons: `unsigned`, `unknown_key`
(signed, but the device has no registered key), `bad_signature` (another key, device, topic or
a tampered payload), `replayed` (a counter below the last accepted), `duplicate` (the last
accepted counter again: a QoS 1 redelivery or a retained copy, logged at DEBUG only) and
`unsigned_success` (see below).

Two exceptions, both documented in docs/trust.md:
- The Last Will (the retained offline state the broker publishes when a device vanishes) is
  signed when the agent connects, so its counter is older than what the device said since. A
  validly signed offline state with an old counter only marks the device offline (its content
  is dropped, the counter is not moved): a replay of it can do no more than the broker itself
  could, by not delivering the device's messages.
- `report_signatures: optional` (a migration aid) accepts *unsigned* messages of devices that
  have no registered key (counted in `accepted_unsigned`), except the lifecycle events that
  would count as a rollout success (`committed`, `offline_install`: refused as
  `unsigned_success`); and rollouts read only the reported states of devices with a key
  (`fleet.rollouts.records`), so rollout success comes only from signed reports in either mode.
  A device with a registered key is held to its signature in both modes.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal

from prometheus_client.core import CounterMetricFamily

from agent.contract.protocol import TopicKind, decode_event, decode_reported, parse_topic
from agent.contract.report_auth import HEADER, verify_report
from agent.errors import BadReportSignatureError, MessageError, ReportAuthError, UnsignedReportError
from agent.transport import Message
from fleet.delivery.malformed import MalformedLog
from fleet.devices.report_keys import ReportKeyRepo

logger = logging.getLogger("edgefleet.fleet.reports")
Mode = Literal["required", "optional"]
KINDS = {TopicKind.REPORTED: "reported", TopicKind.EVENTS: "events", TopicKind.TELEMETRY: "telemetry",
         TopicKind.DATASET: "dataset"}
REASONS = ("unsigned", "unknown_key", "bad_signature", "replayed", "duplicate", "unsigned_success")
SUCCESS_EVENTS = frozenset({"committed", "offline_install"})
REDELIVERABLE = frozenset({"telemetry", "events"})  # kinds acknowledged only once stored (acked streams)


def signature_of(msg: Message) -> str | None:
    """The message's `efsig` user property (the first one), or None."""
    for name, value in msg.user_properties:
        if name == HEADER:
            return value
    return None


class ReportVerifier:
    """`Publisher.inbound_check`: True lets a device message on to its callbacks.

    Runs on the publisher's inbound thread, on the acked streams' workers and on the dataset
    ingest's worker (one gate for all, so /metrics counts every refusal once); `last_signed` says
    whether the message this thread just let through was signed (False only for `optional` mode's
    keyless devices), so it is thread-local. Counters are read by /metrics from other threads (under a lock).
    """

    @property
    def last_signed(self) -> bool:
        return bool(getattr(self._local, "signed", False))

    @last_signed.setter
    def last_signed(self, value: bool) -> None:
        self._local.signed = value

    def __init__(self, keys: ReportKeyRepo, prefix: str, mode: Mode = "required",
                 on_offline: Callable[[str], None] | None = None,
                 log: MalformedLog | None = None) -> None:
        if mode not in ("required", "optional"):
            raise ValueError(f"report_signatures must be 'required' or 'optional', not {mode!r}")
        self.keys = keys
        self.prefix = prefix
        self.mode: Mode = mode
        self.on_offline = on_offline
        self.log = log or MalformedLog(logger)
        self._local = threading.local()
        self.stale_wills = 0
        self._refused: Counter[tuple[str, str]] = Counter()
        self._unsigned: Counter[str] = Counter()
        self._redelivered: Counter[str] = Counter()  # claimed counters let on again (see __call__)
        self._lock = threading.Lock()

    def __call__(self, msg: Message, redelivery: bool = False) -> bool:
        """True lets `msg` on. `redelivery=True` (the acked telemetry and events streams): a
        telemetry report or event whose counter was already claimed, but that arrives again, is a
        broker redelivery of a message a worker received and never acknowledged (it died before
        the flush that would have stored it), so it goes on to the store, whose (device, seq) key
        stores it at most once. Without this, a SIGKILLed worker's messages were claimed here and
        then lost."""
        try:
            parsed = parse_topic(self.prefix, msg.topic)
        except MessageError:
            return True  # not a device report topic: the publisher's handler drops it
        kind = KINDS.get(parsed.kind)
        device = parsed.device_id
        if kind is None or device is None or (kind == "reported" and not msg.payload):
            return True  # an empty retained payload clears the topic; the handler ignores it
        self.last_signed = False
        header = signature_of(msg)
        key = self.keys.key_of(device)
        if key is None:
            return self._keyless(kind, device, msg, header)
        try:
            counter = verify_report(key, kind, device, msg.payload, header, last_counter=-1)
        except BadReportSignatureError as exc:
            fresh = self.keys.key_of(device, fresh=True)  # rotated since it was cached?
            if fresh is None or fresh == key:
                return self._refuse(kind, "bad_signature", device, exc)
            try:
                counter = verify_report(fresh, kind, device, msg.payload, header, last_counter=-1)
            except ReportAuthError as again:
                return self._refuse(kind, "bad_signature", device, again)
        except UnsignedReportError as exc:
            return self._refuse(kind, "unsigned", device, exc)
        refused = self.keys.advance(device, kind, counter)
        redelivered = refused is not None and redelivery and kind in REDELIVERABLE
        if refused is None or (redelivered and self.keys.claimed(device, kind, counter)):
            if refused is not None:
                with self._lock:
                    self._redelivered[kind] += 1
            self.last_signed = True
            return True
        if kind == "reported" and self._is_offline(msg, device):
            self.stale_wills += 1  # the (retained) Last Will again: offline, nothing else
            if self.on_offline is not None:
                self.on_offline(device)
            return False
        return self._refuse(kind, refused, device, f"{kind} report from {device!r} {refused}: counter "
                            f"{counter} was accepted before (or is too old)")

    def _keyless(self, kind: str, device: str, msg: Message, header: str | None) -> bool:
        if header is not None:
            return self._refuse(kind, "unknown_key", device, f"{kind} report from {device!r} is signed, but "
                                "the device has no registered report key")
        if self.mode == "required":
            return self._refuse(kind, "unsigned", device, f"{kind} report from {device!r} carries no "
                                f"{HEADER} signature (report_signatures: required)")
        if kind == "events":
            try:
                event = decode_event(msg.payload, device)
            except MessageError:
                return True  # the handler counts it as malformed
            if event.type in SUCCESS_EVENTS:
                return self._refuse(kind, "unsigned_success", device, f"unsigned {event.type!r} event from "
                                    f"{device!r}: rollout success is taken from signed reports only")
        with self._lock:
            self._unsigned[kind] += 1
        return True

    @staticmethod
    def _is_offline(msg: Message, device: str) -> bool:
        try:
            return not decode_reported(msg.payload, device).online
        except MessageError:
            return False

    def _refuse(self, kind: str, reason: str, device: str, error: object) -> bool:
        with self._lock:
            self._refused[(kind, reason)] += 1
        if reason == "duplicate":
            logger.debug("duplicate signed report dropped: %s", error)
        else:
            self.log.note(f"report_{reason}", str(error), device=device, topic_kind=kind)
        return False

    def refused(self) -> dict[tuple[str, str], int]:
        """Refused messages per (kind, reason) since start, every pair present (zero included)."""
        with self._lock:
            return {(k, r): self._refused.get((k, r), 0) for k in KINDS.values() for r in REASONS}

    def accepted_unsigned(self) -> dict[str, int]:
        """Unsigned messages of keyless devices let through (`optional` mode), per kind."""
        with self._lock:
            return {k: self._unsigned.get(k, 0) for k in KINDS.values()}


def report_families(gate: object) -> Iterator[CounterMetricFamily]:
    """`edgefleet_reports_refused_total{kind,reason}` and `edgefleet_reports_unsigned_total{kind}`."""
    refused = CounterMetricFamily("edgefleet_reports_refused", "Device reports refused: unsigned, wrong "
                                  "key, replayed, ... (report_verify.py)", labels=["kind", "reason"])
    unsigned = CounterMetricFamily("edgefleet_reports_unsigned", "Unsigned reports of keyless devices "
                                   "accepted (report_signatures: optional)", labels=["kind"])
    if isinstance(gate, ReportVerifier):
        for (kind, reason), n in gate.refused().items():
            refused.add_metric([kind, reason], n)
        for kind, n in gate.accepted_unsigned().items():
            unsigned.add_metric([kind], n)
    yield refused
    yield unsigned
