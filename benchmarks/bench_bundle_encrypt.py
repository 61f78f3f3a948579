"""Decrypt-and-install cost of a sealed ~7 MB bundle against the plain verify + extract, same run.

What a device of the cohort does for a sealed bundle (`agent.lifecycle.decrypt.SealingExtractor`):
unwrap its content key from the recipients document (X25519 + HKDF + AES-GCM), then decrypt the
1 MiB AES-256-GCM chunks straight into the extraction directory while the archive checks and the
model digest run, and check the sealed file's sha256 against the signed one. Baseline: the plain
bundle's `extract_bundle` (whole-file sha256 + length + extract), same model, same run. No fsync
in either (storage-bound, the same for both). Also reported: the fleet's sealing throughput and
the time to wrap a content key for 1,000 devices.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.contract.bundle import bundle_digest, extract_bundle
from agent.contract.director import TargetRef
from agent.contract.envelope import WrappedKeys, wrap_content_key
from agent.lifecycle.decrypt import SealingExtractor
from benchmarks.bundle_fixture import random_bundle, timed
from fleet.registry.sealing import seal_bundle

NAME = "bundle_encrypt"
DESCRIPTION = "decrypt + install a sealed 7 MB bundle vs plain verify + extract (same run)"

MODEL_BYTES = 7 * 1000 * 1000
REPEATS = 9
FLEET = 1000


class _Doc:
    def __init__(self, path: Path) -> None:
        self.path = path

    def download_target(self, target_path: str, expected: TargetRef | None = None) -> Path:
        return self.path


def run() -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-encrypt-"))
    try:
        manifest, plain = random_bundle(work / "bench.efb", MODEL_BYTES)
        t0 = time.perf_counter()
        _, key = seal_bundle(plain, work / "bench.sealed")
        seal_s = time.perf_counter() - t0
        sealed = work / "bench.sealed"
        plain_sha, sealed_sha = bundle_digest(plain), bundle_digest(sealed)
        device = X25519PrivateKey.generate()
        others = [X25519PrivateKey.generate().public_key() for _ in range(FLEET - 1)]
        t0 = time.perf_counter()
        entries = [wrap_content_key(key, pub, f"dev-{i:04d}", sealed_sha) for i, pub in enumerate(others)]
        entries.append(wrap_content_key(key, device.public_key(), "dev-me", sealed_sha))
        wrap_s = time.perf_counter() - t0
        doc = work / "recipients.json"
        doc.write_bytes(WrappedKeys(bundle_id=manifest.bundle_id, bundle_sha256=sealed_sha,
                                    recipients=entries).to_json())
        extractor = SealingExtractor(_Doc(doc), "dev-me", lambda: device)
        counter = iter(range(10**6))

        def install_plain() -> None:
            dest = work / f"p{next(counter)}"
            extract_bundle(plain, dest, expected_sha256=plain_sha, expected_length=plain.stat().st_size,
                           durable=False)
            shutil.rmtree(dest)

        def install_sealed() -> None:
            dest = work / f"s{next(counter)}"
            out = extractor(sealed, dest, expected_sha256=sealed_sha, expected_length=sealed.stat().st_size)
            assert out.manifest.bundle_id == "bench-1.0.0"
            shutil.rmtree(dest)

        install_plain()
        install_sealed()  # warm the page cache
        base, base_cpu = timed(install_plain, REPEATS)
        enc, enc_cpu = timed(install_sealed, REPEATS)
        base2, _ = timed(install_plain, REPEATS)
        base = min(base, base2)
        mb = plain.stat().st_size / 1e6
        return {
            "bundle_encrypt_plain_install_ms": base * 1e3,
            "bundle_encrypt_sealed_install_ms": enc * 1e3,
            "bundle_encrypt_sealed_vs_plain_ratio": enc / base,
            "bundle_encrypt_sealed_cpu_vs_plain_cpu_ratio": enc_cpu / base_cpu,
            "bundle_encrypt_seal_mb_per_s": mb / seal_s,
            "bundle_encrypt_wrap_1000_devices_ms": wrap_s * 1e3,
            "bundle_encrypt_recipients_doc_bytes_per_device": doc.stat().st_size / FLEET,
            "bundle_encrypt_sealed_overhead_bytes": sealed.stat().st_size - plain.stat().st_size,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
