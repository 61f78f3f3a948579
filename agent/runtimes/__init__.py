"""Model runtimes: pick the engine named by the manifest and return a ready `LoadedModel`."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from agent.contract.manifest import Manifest
from agent.errors import MisuseError, RuntimeFailure
from agent.logs import log_event
from agent.runtimes.base import LoadedModel, ModelRuntime, validate_inputs

__all__ = ["LoadedModel", "ModelRuntime", "available_runtimes", "load_model", "validate_inputs"]

_log = logging.getLogger("edgefleet.runtimes")


def available_runtimes() -> list[str]:
    """Runtimes whose engine is importable here (`onnx`, `tflite`), without importing them."""
    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append("onnx")
    if (
        importlib.util.find_spec("ai_edge_litert") is not None
        or importlib.util.find_spec("tflite_runtime") is not None
    ):
        found.append("tflite")
    return found


def load_model(model_path: Path, manifest: Manifest, threads: int = 1) -> LoadedModel:
    """Load, check and warm `model_path` with the runtime `manifest.runtime` names.

    Raises `RuntimeFailure` if the engine is missing, the file cannot be loaded, or it disagrees
    with the manifest; `MisuseError` if `model_path` does not exist.
    """
    if not model_path.is_file():
        raise MisuseError(f"model file not found: {model_path}")
    runtime: ModelRuntime
    if manifest.runtime == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            raise RuntimeFailure("onnxruntime is not installed (pip install 'edgefleet[agent]')")
        from agent.runtimes.onnx import OnnxRuntime  # lazy: the engine in use only

        runtime = OnnxRuntime(threads=threads)
    else:
        from agent.runtimes.litert import LiteRtRuntime  # lazy: the engine in use only

        runtime = LiteRtRuntime(threads=threads)
    t0 = time.perf_counter()
    runtime.load(model_path, manifest)
    log_event(
        _log,
        "runtime.loaded",
        model=manifest.bundle_id,
        runtime=manifest.runtime,
        threads=threads,
        load_ms=round((time.perf_counter() - t0) * 1000, 2),
    )
    return LoadedModel(runtime, manifest, model_path)
