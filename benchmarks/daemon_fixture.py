"""The daemon's serving path for benchmarks: what `agent.daemon.core` puts behind the local API
(the lifecycle's holder, the telemetry tap folding every request, a prediction id per row),
without the daemon's broker, trust and lifecycle around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def daemon_path(d: Path, data: bytes) -> tuple[Any, Any]:
    """What the daemon serves: the lifecycle's holder, the telemetry tap folding every request
    and recording one prediction id per row (a classifier's profile, so ids are tracked)."""
    from agent.contract.manifest import FeatureProfile, PerformanceSpec, ReferenceProfile
    from agent.daemon.served_model import ServedModel
    from agent.daemon.serving import ModelCatalog, TelemetryTap
    from agent.serving.model_holder import ModelHolder
    from agent.telemetry.queue import ReportQueue
    from simulators.models import mlp_manifest

    num = {"kind": "numeric", "edges": [-2.0, 0.0, 2.0]}
    profile = ReferenceProfile(
        input_name="x",
        features=[FeatureProfile(name=f"f{i}", **num) for i in range(32)],  # type: ignore[arg-type]
        outputs=[FeatureProfile(name=f"logits_{i}", **num) for i in range(4)],  # type: ignore[arg-type]
        performance=PerformanceSpec(task="classification", classes=4, scores="logits"),
    )
    manifest = mlp_manifest(data).model_copy(update={"reference_profile": profile})
    catalog, holder = ModelCatalog(threads=1), ModelHolder()
    holder.swap(catalog.load(d / "model.onnx", manifest, 1), manifest.bundle_id, keep_previous=False)
    tap = TelemetryTap(ReportQueue(d / "telemetry.sqlite"), catalog, "bench", "bench")
    return ServedModel(holder, catalog, tap), tap
