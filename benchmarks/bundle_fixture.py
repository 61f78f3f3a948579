"""The bundle the bundle benchmarks time, and how they time it.

`bench_bundle_verify` and `bench_bundle_encrypt` both measure a device's install path over a
bundle of random model bytes (verification and decryption cost do not depend on the content),
with the same manifest, and take medians of wall and CPU time over repeats, so their figures
stay comparable with each other and with earlier runs in docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from agent.contract.bundle import write_bundle
from agent.contract.manifest import Manifest, TensorSpec


def random_bundle(path: Path, model_bytes: int) -> tuple[Manifest, Path]:
    """Write `bench-1.0.0` (an ONNX-labelled model of `model_bytes` random bytes) to `path`."""
    model = os.urandom(model_bytes)
    manifest = Manifest(
        name="bench",
        version="1.0.0",
        runtime="onnx",
        model_file="model.onnx",
        model_digest="sha256:" + hashlib.sha256(model).hexdigest(),
        model_size=len(model),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[None, 32])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[None, 4])],
    )
    return manifest, write_bundle(manifest, model, path)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time (all threads of this process) of `repeats` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)
