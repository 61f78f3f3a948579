"""Dataset chunks from devices: admitted only under an active collection, then assembled.

`DatasetIngest.admit(device_id, payload)` is the one door: the device id is the one in the
topic (the broker's ACL lets a device write only `.../devices/<its id>/dataset`); the chunk is
decoded (malformed: refused), it must name a collection whose policy went to that device and
is still collecting (`decisions.admits_chunks`; otherwise refused as `no_policy`), and then
`DatasetStore.ingest_chunk` keeps it (duplicates by the (device, upload, index) key), checks
the reassembled archive's sha256 and records the dataset version with its provenance. Every
refusal is counted by reason (`counters`), never raised.

As a component it subscribes to `.../devices/+/dataset` on the publisher's MQTT transport (in
the ingest share group when the roles are split) and works off the network thread: messages
go through a bounded queue to one worker.
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
from fleet.errors import NotFound
from fleet.registry.datasets import DatasetStore

logger = logging.getLogger("edgefleet.collection.ingest")
QUEUE_SIZE = 256


class DatasetIngest:
    """Component `dataset-ingest`."""

    name = "dataset-ingest"

    def __init__(self, datasets: DatasetStore, collections: CollectionStore,
                 clock: Callable[[], float] = time.time,
                 transport: Transport | None = None, topics: Topics | None = None,
                 share_group: str | None = None, owns_store: bool = False) -> None:
        self.datasets, self.collections, self.clock = datasets, collections, clock
        self.transport, self.topics, self.share_group = transport, topics, share_group
        self.owns_store = owns_store  # close the dataset store at stop
        self._queue: queue.Queue[Message | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None

    @property
    def counters(self) -> dict[str, object]:
        c = self.datasets.counters
        return {"chunks": c.chunks, "duplicates": c.duplicates, "rejected": c.rejected,
                "reasons": dict(c.reasons)}

    def admit(self, device_id: str, payload: bytes) -> str:
        """"partial", "complete", "duplicate" or "rejected" (see the module docstring)."""
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
                parsed = parse_topic(self.topics.prefix, msg.topic) if self.topics else None
            except MessageError:
                continue
            if parsed is None or parsed.kind is not TopicKind.DATASET or parsed.device_id is None:
                continue
            try:
                self.admit(parsed.device_id, msg.payload)
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
