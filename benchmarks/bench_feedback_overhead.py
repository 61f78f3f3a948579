"""What prediction ids cost the serving path, and what matching labels costs.

In one process, the daemon's serving glue (`ServedModel` + `TelemetryTap`) over the real MLP
32-64-64-4 (onnxruntime, batch 1) with a calibrated 4-class profile; `InferenceService.predict_ids`
with the tap as feedback sink (ids recorded per request) against the same service without a
sink (the baseline, same run), interleaved in rounds so load hits both alike; medians. Then
`TelemetryTap.submit` of 1,000-label batches: microseconds per label, matched and folded.
`collecting`: a third service whose tap offers every served row, with its prediction id, to a
reservoir `SampleCollector` (1,000 rows) under a lock, as the daemon's collection runner does
while a signed policy is active; its overhead is against the same baseline.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from agent.contract.collect import CollectPolicy
from agent.daemon.served_model import ServedModel
from agent.daemon.serving import ModelCatalog, TelemetryTap
from agent.serving.api import InferenceService
from agent.serving.model_holder import ModelHolder
from agent.telemetry.collect import SampleCollector
from agent.telemetry.queue import ReportQueue
from fleet.registry.calibration import performance_spec
from fleet.registry.profile import compute_reference_profile
from simulators.models import make_mlp_onnx, mlp_manifest, mlp_reference, mlp_weights

NAME = "feedback_overhead"
DESCRIPTION = "per-request cost of prediction ids (in-process serving glue) and per-label matching cost"

ROUNDS, PER_ROUND = 15, 400


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = make_mlp_onnx(0)
        (d / "m.onnx").write_bytes(model)
        x = np.random.default_rng(0).standard_normal((4000, 32)).astype(np.float32)
        out = mlp_reference(x, mlp_weights(0))
        profile = compute_reference_profile(x, [f"f{i}" for i in range(32)], outputs=out)
        profile = profile.model_copy(update={"performance": performance_spec(out, out.argmax(axis=1))})
        manifest = mlp_manifest(model).model_copy(update={"reference_profile": profile})
        catalog, holder = ModelCatalog(1), ModelHolder()
        holder.swap(catalog.load(d / "m.onnx", manifest, 1), manifest.bundle_id, keep_previous=False)
        queue = ReportQueue(d / "q.sqlite")
        tap = TelemetryTap(queue, catalog, "dev", "c")
        served = ServedModel(holder, catalog, tap)
        queue_c = ReportQueue(d / "qc.sqlite")
        tap_c = TelemetryTap(queue_c, catalog, "dev", "c")
        policy = CollectPolicy(policy_id="bench", max_rows=1000, max_seconds=86400)
        collector = SampleCollector(policy, 32, "dev")
        lock = threading.Lock()

        def sample(bid: str, xs: np.ndarray, ys: np.ndarray | None, pids: list[str] | None) -> None:
            with lock:  # as `CollectionRunner.offer` while a policy is active
                collector.offer(xs, None if ys is None else np.max(ys, axis=1), pids)

        tap_c.sample = sample
        services = {"ids": InferenceService(served, feedback=tap), "baseline": InferenceService(served),
                    "collecting": InferenceService(ServedModel(holder, catalog, tap_c), feedback=tap_c)}
        row = {"x": x[:1]}
        times: dict[str, list[float]] = {k: [] for k in services}
        for _ in range(ROUNDS):
            for name, svc in services.items():
                t0 = time.perf_counter()
                for _ in range(PER_ROUND):
                    svc.predict_ids(row)
                times[name].append((time.perf_counter() - t0) / PER_ROUND * 1e6)
        ids: list[str] = []
        for i in range(0, 4000, 500):
            _, _, got = services["ids"].predict_ids({"x": x[i : i + 500]})
            ids += got or []
        t0 = time.perf_counter()
        for i in range(0, 4000, 1000):
            tap.submit([(pid, 1) for pid in ids[i : i + 1000]])
        per_label = (time.perf_counter() - t0) / 4000 * 1e6
        tap.flush(manifest.bundle_id)
        holder.close()
        queue.close()
        queue_c.close()
    ids_us, base_us = statistics.median(times["ids"]), statistics.median(times["baseline"])
    collecting_us = statistics.median(times["collecting"])
    return {
        "predict_collecting_us": collecting_us,
        "collecting_overhead_us": collecting_us - base_us,
        "predict_with_ids_us": ids_us,
        "predict_baseline_us": base_us,
        "prediction_id_overhead_us": ids_us - base_us,
        "feedback_us_per_label": per_label,
    }
