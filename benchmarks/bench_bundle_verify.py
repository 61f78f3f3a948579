"""Verify-and-extract cost of a 20 MB bundle against a plain sha256 of the same file.

What the agent does after a download: check the whole-file sha256 + length against the
TUF-signed values AND extract safely (which checks the model digest). `extract_bundle` does
both in one pass over the file; the baseline is `hashlib.sha256` over the same file read
with the same chunk size, in the same run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.contract.bundle import bundle_digest, extract_bundle, write_bundle
from agent.contract.manifest import Manifest, TensorSpec

NAME = "bundle_verify"
DESCRIPTION = "verify (whole-file sha256 + length) and safely extract a 20 MB bundle vs plain sha256"

MODEL_BYTES = 20 * 1000 * 1000
REPEATS = 9


def _plain_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            sha.update(data)
    return sha.hexdigest()


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time (all threads of this process)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def run() -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    try:
        model = os.urandom(MODEL_BYTES)  # a raw model payload: verification cost does not depend on content
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
        bundle = write_bundle(manifest, model, work / "bench.efb")
        del model
        size = bundle.stat().st_size
        signed_sha, signed_len = bundle_digest(bundle), size
        counter = iter(range(10**6))

        def verify(durable: bool) -> None:
            dest = work / f"x{next(counter)}"
            extract_bundle(
                bundle, dest, expected_sha256=signed_sha, expected_length=signed_len, durable=durable
            )
            shutil.rmtree(dest)

        _plain_sha256(bundle)  # warm the page cache
        verify(False)
        base, base_cpu = _timed(lambda: _plain_sha256(bundle), REPEATS)
        fast, fast_cpu = _timed(lambda: verify(False), REPEATS)
        base2, base2_cpu = _timed(lambda: _plain_sha256(bundle), REPEATS)
        durable, _ = _timed(lambda: verify(True), 5)
        baseline, baseline_cpu = min(base, base2), min(base_cpu, base2_cpu)
        mb = size / 1e6
        return {
            "bundle_verify_size_mb": mb,
            "bundle_verify_sha256_mb_s": mb / baseline,
            "bundle_verify_mb_s": mb / fast,
            "bundle_verify_vs_sha256_ratio": fast / baseline,
            "bundle_verify_cpu_vs_sha256_cpu_ratio": fast_cpu / baseline_cpu,
            "bundle_verify_durable_mb_s": mb / durable,
            "bundle_verify_durable_vs_sha256_ratio": durable / baseline,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
