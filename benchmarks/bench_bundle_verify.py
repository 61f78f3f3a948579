"""Verify-and-extract cost of a 20 MB bundle against a plain sha256 of the same file.

What the agent does after a download: check the whole-file sha256 + length against the
TUF-signed values AND extract safely (which checks the model digest). `extract_bundle` does
both in one pass over the file; the baseline is `hashlib.sha256` over the same file read
with the same chunk size, in the same run.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from agent.contract.bundle import bundle_digest, extract_bundle
from benchmarks.bundle_fixture import random_bundle, timed

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


def run() -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    try:
        _, bundle = random_bundle(work / "bench.efb", MODEL_BYTES)
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
        base, base_cpu = timed(lambda: _plain_sha256(bundle), REPEATS)
        fast, fast_cpu = timed(lambda: verify(False), REPEATS)
        base2, base2_cpu = timed(lambda: _plain_sha256(bundle), REPEATS)
        durable, _ = timed(lambda: verify(True), 5)
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
