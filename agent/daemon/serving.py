"""The daemon's serving glue: the local API's `Predictor` over the lifecycle's holder, and telemetry.

Why glue and not a change to either side: the lifecycle swaps models in
`agent.serving.model_holder.ModelHolder` (hot swap, standby, shadow), the local API servers want a
`agent.serving.api.Predictor` (`predict` + `info`), and telemetry wants every served
request's inputs, outputs and latency folded into the sketch of the bundle that served it.
`agent.daemon.served_model.ServedModel` is that adapter; `TelemetryTap` here keeps one
`TelemetrySketch` per served bundle and moves finished intervals into the store-and-forward
`ReportQueue`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract.manifest import Manifest
from agent.errors import MisuseError
from agent.logs import log_event
from agent.runtimes import load_model
from agent.serving.model_holder import LoadedModel
from agent.telemetry.exposition import ServingCounts, render
from agent.telemetry.feedback import PredictionLog
from agent.telemetry.queue import ReportQueue
from agent.telemetry.sketch import TelemetrySketch

log = logging.getLogger(__name__)

#: Served rows batched before they are folded into the telemetry sketch (see `TelemetryTap.fold`).
FOLD_BATCH_ROWS = 256


class ModelCatalog:
    """What the daemon learned about each bundle it loaded: manifest and model info.

    Filled by `load` (passed to the `Lifecycle` as its loader), so `info()` never reads disk.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.manifests: dict[str, Manifest] = {}
        self.infos: dict[str, dict[str, Any]] = {}

    def load(self, model_path: Path, manifest: Manifest, threads: int) -> LoadedModel:
        """Load with the real runtime; raises as `agent.runtimes.load_model`."""
        model = load_model(model_path, manifest, threads=threads)
        bid = f"{manifest.name}-{manifest.version}"
        self.manifests[bid] = manifest
        self.infos[bid] = dict(model.info())
        return model


class TelemetryTap:
    """Folds served requests into the sketch of the serving bundle; bounded, thread-safe.

    It is also the local API's `FeedbackSink`: served rows are remembered in `predictions`
    (a bounded ring) and labels sent later are matched there and folded into the serving
    bundle's sketch (a label for a bundle no longer served counts as expired: its interval
    was already reported). With data collection wired (`sample`, `labelled`), served rows are
    offered with their ids when `record` issues them, and matched labels of the serving bundle
    are handed on, so a sample still held can attach them to its rows.
    """

    def __init__(self, queue: ReportQueue, catalog: ModelCatalog, device_id: str, cohort: str,
                 predictions: PredictionLog | None = None) -> None:
        self.predictions = predictions or PredictionLog()
        self.queue = queue
        self.catalog = catalog
        self.device_id = device_id
        self.cohort = cohort
        self._lock = threading.Lock()
        self._bundle: str | None = None
        self._sketch: TelemetrySketch | None = None
        self._warned: set[str] = set()
        self._pending_x: list[np.ndarray] = []  # batched requests of `_bundle`, see `fold`
        self._pending_y: list[np.ndarray] = []
        self._pending_latency: list[float] = []
        self._pending_rows = 0
        # Per pending row: its prediction's sequence in `predictions` (-1: none issued) and the
        # log's clock when it was served; rows before `_ids_stored` are in the log already.
        self._pending_seq: list[int] = []
        self._pending_t: list[float] = []
        self._ids_stored = 0

        self._totals: dict[str, ServingCounts] = {}  # closed intervals per bundle, for /metrics
        # data collection (`agent.daemon.collection`): served rows with their prediction ids, and
        # the labels matched later for ids of the serving bundle
        self.sample: Callable[[str, np.ndarray, np.ndarray | None, list[str] | None], None] | None = None
        self.labelled: Callable[[str, list[str], list[float]], None] | None = None

    def _sketch_for(self, bundle_id: str) -> TelemetrySketch | None:
        """The sketch of `bundle_id` (rotating out the previous bundle's interval). Lock held."""
        if bundle_id == self._bundle:
            return self._sketch
        self._flush_locked()
        manifest = self.catalog.manifests.get(bundle_id)
        self._bundle = bundle_id
        self._sketch = None
        if manifest is not None:
            self._sketch = TelemetrySketch(
                manifest.reference_profile,
                self.device_id,
                manifest.name,
                manifest.version,
                cohort=self.cohort,
                first_seq=self.queue.next_seq(),
            )
        return self._sketch

    def fold(
        self,
        bundle_id: str,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray] | None,
        latency_s: float,
        error: bool,
        calls: int = 1,
    ) -> None:
        """Fold one served request. Successful single-tensor requests are batched (copied, so
        the Unix server may reuse its receive buffer) and folded `FOLD_BATCH_ROWS` rows at a
        time, or when the interval is flushed or the bundle changes: folding costs about the
        same for 1 row as for 256, so per request it is a copy and an append. `calls` > 1: the
        rows are that many requests micro-batched together (each counted, with this latency)."""
        x = _single(inputs) if not error and outputs is not None else None
        y = _single(outputs) if x is not None else None
        if x is not None and y is not None and x.ndim == 2:
            with self._lock:
                if self._sketch_for(bundle_id) is None:
                    return
                if self._pending_x and self._pending_x[0].shape[1] != x.shape[1]:
                    self._fold_pending_locked()
                self._pend_locked(x, y, latency_s, calls, -1, 0.0)
            return
        with self._lock:
            self._fold_pending_locked()
            sketch = self._sketch_for(bundle_id)
            if sketch is None:
                return
            x = _single(inputs)
            if x is None:  # several input tensors: count the request, fold no rows
                manifest = self.catalog.manifests[bundle_id]
                x = np.empty((0, len(manifest.reference_profile.features)), np.float32)
            y = _single(outputs) if outputs is not None else None
            try:
                sketch.update(x, y, latency_s, error)
            except MisuseError as exc:  # inputs outside the profile's columns: count, do not fail
                if bundle_id not in self._warned:
                    self._warned.add(bundle_id)
                    log_event(
                        log, "telemetry.fold_skipped", logging.WARNING, bundle=bundle_id, error=str(exc)
                    )
                sketch.record_rejected()

    def served(self, bundle_id: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
               latency_s: float, calls: int = 1) -> list[str] | None:
        """`fold` and `record` of one successful request in one step under one lock (the
        daemon's serving path). The ids are handed out now; what they stand for goes into
        `predictions` with the batched rows (`_fold_pending_locked`), or before any label is
        matched (`submit`), so per request there is no prediction to compute and no ring to
        write."""
        x, y = _single(inputs), _single(outputs)
        if x is None or y is None or x.ndim != 2:
            self.fold(bundle_id, inputs, outputs, latency_s, False, calls)
            return self.record({"bundle_id": bundle_id}, outputs, inputs)
        ids = None
        with self._lock:
            if self._sketch_for(bundle_id) is not None:
                rows = x.shape[0]
                first = self.predictions.reserve(rows)
                self._pend_locked(x, y, latency_s, calls, first, self.predictions.now())
                ids = self.predictions.ids(first, rows)
        if self.sample is not None and bundle_id:
            self.sample(bundle_id, x, y, ids)
        return ids

    def _pend_locked(self, x: np.ndarray, y: np.ndarray, latency_s: float, calls: int,
                     first: int, t: float) -> None:
        """Batch one request's rows (copied: the server may reuse its buffers) for folding."""
        if self._pending_x and self._pending_x[0].shape[1] != x.shape[1]:
            self._fold_pending_locked()
        rows = x.shape[0]
        self._pending_x.append(x.copy())
        self._pending_y.append(y.copy())
        if calls == 1:
            self._pending_latency.append(latency_s)
        else:
            self._pending_latency.extend([latency_s] * calls)
        if rows == 1:
            self._pending_seq.append(first)
            self._pending_t.append(t)
        else:
            self._pending_seq.extend(range(first, first + rows) if first >= 0 else [-1] * rows)
            self._pending_t.extend([t] * rows)
        self._pending_rows += rows
        if self._pending_rows >= FOLD_BATCH_ROWS:
            self._fold_pending_locked()

    def _store_ids_locked(self, ys: np.ndarray | None = None) -> None:
        """Put the pending rows' predictions into `predictions` (those not stored yet). `ys`:
        all pending output rows, when the caller has them concatenated already."""
        done = self._ids_stored
        seq = np.asarray(self._pending_seq[done:], dtype=np.int64)
        self._ids_stored = len(self._pending_seq)
        has = seq >= 0
        if self._sketch is None or self._bundle is None or not has.any():
            return
        if ys is None:
            ys = np.concatenate(self._pending_y)
        predicted = self._sketch.performance.predicted(ys[done:])
        times = np.asarray(self._pending_t[done:], dtype=np.float64)
        self.predictions.fill(self._bundle, seq[has], predicted[has], times[has])

    def record(self, model: dict[str, Any], outputs: dict[str, np.ndarray],
               inputs: dict[str, np.ndarray] | None = None) -> list[str] | None:
        """`FeedbackSink.record`: one prediction id per served row (None: not a one-output model).
        The rows, their outputs and these ids are then offered to `sample` (a signed collection
        policy decides what it keeps): sampling here, not in `fold`, is what lets a kept row
        know the id its label will come back with."""
        bid = str(model.get("bundle_id") or "")
        y = _single(outputs)
        with self._lock:
            sketch = self._sketch_for(bid) if bid else None
        ids = None
        if sketch is not None and y is not None:
            ids = self.predictions.record(bid, sketch.performance.predicted(y))
        if self.sample is not None and inputs is not None and bid:
            x = _single(inputs)
            if x is not None and y is not None and x.ndim == 2:
                self.sample(bid, x, y, ids)
        return ids

    def submit(self, items: list[tuple[object, object]]) -> dict[str, int]:
        """`FeedbackSink.submit`: match labels, fold them into the serving bundle's sketch.
        Under the tap's lock, so the ids handed out by `served` are stored before they are
        looked up and no new ones are issued meanwhile."""
        with self._lock:
            self._store_ids_locked()
            current, sketch = self._bundle, self._sketch

            def accepts(bid: str, label: float) -> bool:  # refused labels leave the row open
                return sketch is None or bid != current or sketch.performance.accepts(label)

            outcome = self.predictions.match(items, accepts)
            unmatched = {"unknown": outcome.unknown, "expired": outcome.expired,
                         "duplicate": outcome.duplicate, "invalid": outcome.invalid}
            sketch = self._sketch if self._bundle is not None else None
            for bid, pairs in outcome.pairs.items():
                if sketch is not None and bid == self._bundle:
                    invalid = sketch.fold_labels(np.asarray(pairs.predicted), np.asarray(pairs.labels))
                    outcome.matched -= invalid
                    outcome.invalid += invalid
                else:
                    outcome.matched -= len(pairs.labels)
                    outcome.expired += len(pairs.labels)
                    unmatched["expired"] += len(pairs.labels)
            if sketch is not None:
                for what, n in unmatched.items():
                    sketch.count_feedback(what, n)
            current = self._bundle if sketch is not None else None
        held = outcome.pairs.get(current or "")
        if self.labelled is not None and current is not None and held is not None:
            self.labelled(current, held.ids, held.labels)  # rows still held by a sample get them
        return outcome.counts()

    def rejected(self, bundle_id: str) -> None:
        with self._lock:
            sketch = self._sketch_for(bundle_id)
            if sketch is not None:
                sketch.record_rejected()

    def _fold_pending_locked(self) -> None:
        """Fold the batched requests into the current sketch (they all belong to its bundle)."""
        if not self._pending_x:
            return
        ys = np.concatenate(self._pending_y)
        self._store_ids_locked(ys)
        xs, lats = self._pending_x, self._pending_latency
        self._pending_x, self._pending_y, self._pending_latency, self._pending_rows = [], [], [], 0
        self._pending_seq, self._pending_t, self._ids_stored = [], [], 0
        if self._sketch is None:
            return
        try:
            self._sketch.update_batch(np.concatenate(xs), ys, lats)
        except (MisuseError, ValueError) as exc:  # rows outside the profile's columns: count, do not fail
            if self._bundle is not None and self._bundle not in self._warned:
                self._warned.add(self._bundle)
                log_event(log, "telemetry.fold_skipped", logging.WARNING, bundle=self._bundle, error=str(exc))
            self._sketch.record_rejected(len(lats))

    def _flush_locked(self) -> int | None:
        self._fold_pending_locked()
        if self._sketch is None or self._bundle is None:
            return None
        report = self._sketch.snapshot_and_reset()
        before = self._totals.get(self._bundle) or ServingCounts(report.model, report.version)
        self._totals[self._bundle] = before.plus(report.requests, report.errors, report.rejected,
                                                 report.latency_counts, report.latency_sum_s)
        report.seq = max(report.seq, self.queue.next_seq())  # the queue owns the numbering
        return self.queue.put(report)

    def serving_counts(self) -> list[ServingCounts]:
        """Per served version since the agent started: the closed intervals plus the open one."""
        with self._lock:
            self._fold_pending_locked()  # the batched rows count too
            totals = dict(self._totals)
            if self._sketch is not None and self._bundle is not None:
                sk = self._sketch
                before = totals.get(self._bundle) or ServingCounts(sk.model, sk.version)
                totals[self._bundle] = before.plus(*sk.live_counts())
        return [totals[b] for b in sorted(totals)]

    def metrics_text(self) -> bytes:
        """`GET /metrics` of the agent's HTTP API (agent/telemetry/exposition.py)."""
        return render(self.serving_counts(), self.cohort)

    def flush(self, serving: str | None) -> int | None:
        """Close the current interval into the queue; returns its sequence (None: nothing served)."""
        with self._lock:
            if serving is not None:
                self._sketch_for(serving)
            return self._flush_locked()


def _single(tensors: dict[str, np.ndarray] | None) -> np.ndarray | None:
    """The one tensor of a single-tensor model as rows (sketches are keyed to one table)."""
    if not tensors or len(tensors) != 1:
        return None
    arr = next(iter(tensors.values()))
    if type(arr) is np.ndarray and arr.ndim == 2:  # the common case, as it is
        return arr
    arr = np.asarray(arr)
    return arr.reshape(arr.shape[0], -1) if arr.ndim >= 1 else arr.reshape(1, 1)
