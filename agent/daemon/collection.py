"""The daemon's side of opt-in data collection: policy from the signed document, sample, upload.

Nothing is collected without a signed policy: `on_document` is called with the bytes the
`DirectorGate` has just accepted and verifies them once more (signature, addressee, expiry)
before it looks at their `collect` policy; rows are offered only while such a policy is
active and only for the bundle the document names (`<name>-<version>` of its target). A
document without a policy withdraws the one in force: the sample and any upload not yet sent
are discarded (nothing leaves the device once the fleet stopped asking).

Lifecycle, persisted in `<state_dir>/collect/active.json` before acting on it:

| phase      | event                                  | next       | action                         |
|------------|----------------------------------------|------------|--------------------------------|
| (none)     | document with a new policy             | collecting | remember policy, bundle, start |
| collecting | `max_seconds` since start (`tick`)     | uploading  | archive the sample to disk     |
| collecting | time up and no row was ever served     | done       | nothing to send                |
| uploading  | every chunk acknowledged by the broker | done       |                                |
| any        | document without a policy / another    | withdrawn / collecting | discard files      |

Restarts: the phase and start time survive, the in-memory sample does not (a restarted agent
keeps sampling for the time left, into a fresh sample); an upload resumes at the first chunk
the broker had not acknowledged (`ChunkUploader`; the fleet drops duplicates by index). Each
chunk is signed by the device's report key when it is sent (`report_signer`, kind `dataset`),
so the fleet admits it only from this device, unaltered, once per counter.
Caps: `SampleCollector` never keeps more than `max_rows` rows nor `max_bytes` of values and
stops taking rows after `max_seconds`.
Labels: rows are offered with their prediction ids (`TelemetryTap.record`); a label matched by
the feedback log for an id whose row is still in the sample (phase `collecting`, same agent
run) is attached to it (`on_labels`), and travels in the archive's `labels` column. A label
that comes after the sample was closed, for a row not kept, or that the feedback log refused
(unknown id, past its horizon, a duplicate) is not in the sample.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.collect import CollectPolicy
from agent.contract.director import DirectorTrust, verify_director
from agent.contract.protocol import Topics
from agent.daemon.report_signer import ReportSigner, sign_or_nothing
from agent.durable_io import write_durably
from agent.errors import DirectorError, EdgefleetError
from agent.logs import log_event
from agent.telemetry.collect import ChunkUploader, SampleCollector
from agent.transport import Transport

log = logging.getLogger("edgefleet.agent.collect")
MAX_CHUNKS_PER_TICK = 64
PUBACK_WAIT_S = 5.0


class CollectionRunner:
    """Owns the device's one active collection (thread-safe: serving threads offer rows, the
    MQTT thread hands documents over, the ticker uploads)."""

    def __init__(self, state_dir: Path, device_id: str, cohorts: Collection[str],
                 trust: Callable[[], DirectorTrust], transport: Transport, topics: Topics,
                 clock: Callable[[], float] = time.time, sink: Any = None,
                 signer: ReportSigner | None = None) -> None:
        """`sink`: the daemon's `TelemetryTap`, whose served rows are offered here; `signer`: the
        device's report key (None: no key yet, chunks go unsigned and a strict fleet drops them)."""
        self.dir = state_dir / "collect"
        self.signer = signer
        self.device_id, self.cohorts, self._trust = device_id, frozenset(cohorts), trust
        self.transport, self.topics, self.clock = transport, topics, clock
        self._lock = threading.Lock()
        self._collector: SampleCollector | None = None
        self.state: dict[str, Any] | None = self._load()
        self.sent = 0
        if sink is not None:
            sink.sample = self.offer
            sink.labelled = self.on_labels

    # --- persisted state -------------------------------------------------------------------
    @property
    def _path(self) -> Path:
        return self.dir / "active.json"

    def _load(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self._path.read_bytes())
            CollectPolicy(**state["policy"])  # still a valid policy
            return state
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log_event(log, "collect.state_corrupt", logging.WARNING, error=str(exc))
            return None

    def _save(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_durably(self._path, json.dumps(state, sort_keys=True).encode())
        self.state = state

    @property
    def policy(self) -> CollectPolicy | None:
        return CollectPolicy(**self.state["policy"]) if self.state else None

    @property
    def phase(self) -> str:
        return str(self.state["phase"]) if self.state else "none"

    # --- documents ---------------------------------------------------------------------------
    def on_document(self, payload: bytes, last_sequence: int) -> None:
        """An accepted director document (`last_sequence`: the addressee's sequence before it)."""
        try:
            doc = verify_director(payload, self._trust(), self.device_id, self.cohorts, last_sequence,
                                  datetime.now(UTC))
        except DirectorError as exc:  # the gate accepted it; refuse to collect on any doubt
            log_event(log, "collect.document_refused", logging.WARNING, error=str(exc))
            return
        with self._lock:
            current = self.policy
            new = doc.collect
            if new is not None and current is not None and new.policy_id == current.policy_id:
                return  # the same policy again (a retained copy, or a re-signed document)
            if current is not None and self.phase in ("collecting", "uploading"):
                self._discard()
                self._save({**(self.state or {}), "phase": "withdrawn"})
                log_event(log, "collect.withdrawn", policy=current.policy_id)
            if new is None:
                return
            fields = {f: getattr(new, f) for f in new.__struct_fields__}
            bundle = f"{doc.target.name}-{doc.target.version}"
            self._save({"policy": fields, "bundle": bundle, "started": self.clock(), "phase": "collecting"})
            log_event(log, "collect.started", policy=new.policy_id, bundle=bundle, strategy=new.strategy,
                      max_rows=new.max_rows, max_seconds=new.max_seconds)

    def _discard(self) -> None:
        self._collector = None
        shutil.rmtree(self.dir / "upload", ignore_errors=True)

    # --- rows ----------------------------------------------------------------------------------
    def offer(self, bundle_id: str, x: np.ndarray, y: np.ndarray | None, ids: list[str] | None = None
              ) -> None:
        """Served rows of `bundle_id` (and its outputs: top-class confidence for a classifier;
        and their prediction ids, None when the model's predictions are not tracked)."""
        if self.state is None:  # no policy (the common case): no lock, no copy
            return
        with self._lock:
            if self.state is None or self.state["phase"] != "collecting" or bundle_id != self.state["bundle"]:
                return
            policy = self.policy
            assert policy is not None
            if self._collector is None:
                self._collector = SampleCollector(policy, int(x.shape[1]), self.device_id, self.clock)
                self._collector.started = float(self.state["started"])
            conf = None
            if y is not None and y.ndim == 2 and y.shape[1] > 1 and len(y) == len(x):
                conf = np.max(y, axis=1)
            try:
                self._collector.offer(x, conf, ids)
            except EdgefleetError as exc:  # rows of another width: not this sample
                log_event(log, "collect.row_skipped", logging.WARNING, error=str(exc))

    def on_labels(self, bundle_id: str, ids: list[str], labels: list[float]) -> None:
        """Labels the feedback log matched (row-aligned with their prediction ids) for
        `bundle_id`: attached to the rows the sample still holds."""
        if self.state is None:
            return
        with self._lock:
            if self._collector is None or self.state is None or self.state["phase"] != "collecting" \
                    or bundle_id != self.state["bundle"]:
                return
            self._collector.label(ids, labels)

    # --- ticking --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Close a finished sample, then send what is still to be sent."""
        with self._lock:
            if self.state is None:
                return
            policy = self.policy
            assert policy is not None
            if self.state["phase"] == "collecting" and \
                    self.clock() - float(self.state["started"]) >= policy.max_seconds:
                if self._collector is None:
                    self._save({**self.state, "phase": "done", "rows": 0})
                    log_event(log, "collect.empty", policy=policy.policy_id)
                    return
                archive = self._collector.archive()
                ChunkUploader(self.dir / "upload", policy, self.device_id, archive)  # persisted first
                rows, labelled = self._collector.kept, self._collector.labelled
                self._save({**self.state, "phase": "uploading", "rows": rows, "labelled": labelled})
                self._collector = None
                log_event(log, "collect.sample_closed", policy=policy.policy_id, bytes=len(archive),
                          rows=rows, labelled=labelled)
            if self.state["phase"] != "uploading":
                return
            uploader = ChunkUploader(self.dir / "upload", policy, self.device_id)
            for index, chunk in uploader.pending()[:MAX_CHUNKS_PER_TICK]:
                if not self._send(chunk):
                    return
                uploader.ack(index)
                self.sent += 1
            if uploader.done:
                self._save({**self.state, "phase": "done"})
                shutil.rmtree(self.dir / "upload", ignore_errors=True)
                log_event(log, "collect.uploaded", policy=policy.policy_id, chunks=uploader.total)

    def _send(self, chunk: bytes) -> bool:
        """Publish one chunk (QoS 1), signed now with a fresh counter, and wait for the PUBACK."""
        if not self.transport.connected:
            return False
        try:  # signed per send: a chunk re-sent after a restart must not reuse a counter (a replay)
            delivery = self.transport.publish(self.topics.dataset(), chunk, qos=1,
                                              user_properties=sign_or_nothing(self.signer, "dataset", chunk))
        except EdgefleetError:
            return False
        deadline = time.monotonic() + PUBACK_WAIT_S
        while not delivery.is_published():
            if time.monotonic() > deadline or not self.transport.connected:
                return False
            time.sleep(0.01)
        return True
