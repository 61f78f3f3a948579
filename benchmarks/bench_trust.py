"""Cost of the device's trust checks: director verification and a TUF refresh + download.

Baselines measured in the same run: parsing the same director bytes with `json.loads` plus one
raw Ed25519 verification (the floor any signed-document check pays), and reading + hashing the
same target file (the floor any integrity check pays).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import CryptoSigner

from agent.contract.director import DirectorDocument, DirectorTrust, TargetRef, sign_director, verify_director
from agent.trust import DirectoryFetcher, TrustClient
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository

NAME = "trust"
DESCRIPTION = "director verify vs json+ed25519 floor; TUF refresh/download vs read+sha256 floor"
TARGET_BYTES = 1 << 20


def _median_us(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def _director() -> dict[str, float]:
    signer = CryptoSigner.generate_ed25519()
    trust = DirectorTrust(keys={signer.public_key.keyid: signer.public_key}, threshold=1)
    now = datetime.now(UTC)
    ref = TargetRef(path="models/m/m-1.0.0.efb", length=1234, sha256="a" * 64, name="m", version="1.0.0")
    doc = DirectorDocument(
        device_id="dev-1", sequence=7, issued_at=now, expires=now + timedelta(days=1), target=ref
    )
    data = sign_director(doc, [signer])
    payload = b"x" * 300
    sig = signer.sign(payload)
    key = signer.public_key

    def floor() -> None:
        json.loads(data)
        key.verify_signature(sig, payload)

    return {
        "trust.director_verify_us": _median_us(
            lambda: verify_director(data, trust, "dev-1", [], 6, now), 2000
        ),
        "trust.baseline_json_plus_ed25519_us": _median_us(floor, 2000),
        "trust.director_bytes": float(len(data)),
    }


def _tuf(work: Path) -> dict[str, float]:
    repo = Repository(work / "repo", KeyStore(work / "keys"))
    repo.init(root_threshold=2, root_keys=3)
    bundle = work / "b.efb"
    bundle.write_bytes(bytes(range(256)) * (TARGET_BYTES // 256))
    ref = repo.add_target(bundle, "models/b/b-1.0.0.efb")
    fetcher = DirectoryFetcher(repo.repo_dir)

    def client(name: str) -> TrustClient:
        return TrustClient(
            work / name / "md",
            work / name / "t",
            fetcher,
            fetcher.url_for("metadata"),
            fetcher.url_for("targets"),
            bootstrap_root=repo.root_bytes(),
        )

    first = client("warm")
    first.refresh()
    refresh_us = _median_us(first.refresh, 30)
    cold = []
    for i in range(10):
        c = client(f"cold{i}")
        t0 = time.perf_counter()
        c.download_target(ref.path, ref)
        cold.append((time.perf_counter() - t0) * 1e3)
    cached_us = _median_us(lambda: first.download_target(ref.path, ref), 20)
    floor_ms = _median_us(lambda: hashlib.sha256(bundle.read_bytes()).hexdigest(), 30) / 1e3
    return {
        "trust.tuf_refresh_unchanged_ms": refresh_us / 1e3,
        "trust.tuf_first_refresh_and_download_1MiB_ms": statistics.median(cold),
        "trust.tuf_download_cached_1MiB_ms": cached_us / 1e3,
        "trust.baseline_read_sha256_1MiB_ms": floor_ms,
    }


def run() -> dict[str, float]:
    """Medians of each measurement (see module docstring)."""
    work = Path(tempfile.mkdtemp(prefix="bench-trust-"))
    try:
        return {**_director(), **_tuf(work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
