"""Dataset chunks from devices: admitted only signed, under an active collection; then assembled.

`DatasetIngest.receive(msg)` is the one door for what arrives over MQTT: the chunk must first
pass the fleet's report gate (`fleet.delivery.report_verify.ReportVerifier`, kind `dataset`):
signed by the report key registered for the device its topic names, over this payload, with a
counter not accepted before (so neither a neighbour whose ACL is too wide nor the broker can
upload for a device, alter a chunk, or replay one). A refused chunk changes nothing; it is
counted by the gate (`edgefleet_reports_refused_total{kind="dataset",reason}`) and here as
`report_auth`. `report_signatures: optional` lets unsigned chunks of keyless devices on, as for
the other kinds. The agent signs each send afresh, so a chunk re-sent after a restart carries a
new counter and passes (the store drops it as a duplicate if the first copy arrived).

`admit(device_id, payload)` then takes a verified chunk: the device id is the one in the topic
(the broker's ACL lets a device write only `.../devices/<its id>/dataset`); the chunk is
decoded (malformed: refused), it must name a collection whose policy went to that device and
is still collecting (`decisions.admits_chunks`; otherwise refused as `no_policy`), and then
`DatasetStore.ingest_chunk` keeps it (duplicates by the (device, upload, index) key), checks
the reassembled archive's sha256 and records the dataset version with its provenance. Every
refusal is counted by reason (`counters`), never raised.

As a component it subscribes to `.../devices/+/dataset` on the publisher's MQTT transport (in
the ingest share group when the roles are split) and works off the network thread: messages
go through a bounded queue to one worker, which runs the gate and then `admit`. It refuses to
subscribe without a gate (fail closed).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from agent.contract.collect import decode_chunk
from agent.contract.protocol import TopicKind, Topics, parse_topic
from agent.errors import MessageError
from agent.logs import log_event
from agent.transport import Message, Transport
from fleet.collection.decisions import admits_chunks
from fleet.collection.records import CollectionStore
from fleet.errors import FleetMisuseError, NotFound
from fleet.registry.datasets import DatasetStore

logger = logging.getLogger("edgefleet.collection.ingest")
QUEUE_SIZE = 256


class DatasetIngest:
    """Component `dataset-ingest`."""

    name = "dataset-ingest"

    def __init__(self, datasets: DatasetStore, collections: CollectionStore,
                 clock: Callable[[], float] = time.time,
                 transport: Transport | None = None, topics: Topics | None = None,
                 share_group: str | None = None, owns_store: bool = False,
                 gate: Callable[[Message], bool] | None = None) -> None:
        """`gate`: the fleet's `ReportVerifier` (True lets a chunk on); required with a transport."""
        if transport is not None and gate is None:
            raise FleetMisuseError("a dataset ingest that subscribes needs the report signature gate")
        self.datasets, self.collections, self.clock = datasets, collections, clock
        self.gate = gate
        self.transport, self.topics, self.share_group = transport, topics, share_group
        self.owns_store = owns_store  # close the dataset store at stop
        self._queue: queue.Queue[Message | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None

    @property
    def counters(self) -> dict[str, object]:
        c = self.datasets.counters
        return {"chunks": c.chunks, "duplicates": c.duplicates, "rejected": c.rejected,
                "reasons": dict(c.reasons)}

    def receive(self, msg: Message) -> str | None:
        """One chunk as received: gate, then `admit`; its result, or None (not a dataset topic)."""
        try:
            parsed = parse_topic(self.topics.prefix, msg.topic) if self.topics else None
        except MessageError:
            return None
        if parsed is None or parsed.kind is not TopicKind.DATASET or parsed.device_id is None:
            return None
        if self.gate is None or not self.gate(msg):  # counted and logged by the gate, by reason
            return self.datasets.refuse("report_auth")
        return self.admit(parsed.device_id, msg.payload)

    def admit(self, device_id: str, payload: bytes) -> str:
        """A chunk whose signature passed (`receive`): "partial", "complete", "duplicate" or
        "rejected" (see the module docstring)."""
        try:
            chunk = decode_chunk(payload)
        except MessageError:
            return self.datasets.ingest_chunk(device_id, payload)  # counts it as malformed
        try:
            c = self.collections.get(chunk.policy_id)
        except NotFound:
            c = None
        if c is None or not admits_chunks(c, device_id, self.clock()):
            log_event(logger, "dataset.refused", logging.WARNING, device=device_id, policy=chunk.policy_id)
            return self.datasets.refuse("no_policy")
        result = self.datasets.ingest_chunk(device_id, payload)
        if result == "complete":
            log_event(logger, "dataset.version", device=device_id, policy=chunk.policy_id)
        return result

    # --- component ---------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        try:
            self._queue.put(msg, timeout=5.0)  # backpressure to the broker rather than loss
        except queue.Full:
            log_event(logger, "dataset.queue_full", logging.WARNING, topic=msg.topic)

    def _work(self) -> None:
        while (msg := self._queue.get()) is not None:
            try:
                self.receive(msg)
            except Exception:  # one bad message must not stop the worker
                logger.exception("dataset ingest failed on %s", msg.topic)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="dataset-ingest", daemon=True)
        self._thread.start()
        if self.transport is not None and self.topics is not None:
            self.transport.subscribe(self.topics.all_devices("dataset", self.share_group), self._on_message)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5.0)
            self._thread = None
        if self.owns_store:
            self.datasets.close()
