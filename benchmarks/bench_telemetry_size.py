"""Bytes per telemetry report vs a datasketches KLL report of the same data.

20 numeric features + 1 output, 100 reference-percentile bins each (the profile a bundle
carries), at 1, 100 and 1,000 inferences per interval. Baseline in the same run: one
`kll_floats_sketch(k=200)` per column holding the same values, serialized and concatenated,
then zstd-compressed the same way (the smaller of raw and compressed is counted).
Goals: `report_bytes_1000` <= 2048, `kll_over_report_ratio` (at 1,000) >= 15.
"""

from __future__ import annotations

import numpy as np
import zstandard
from datasketches import kll_floats_sketch

from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.registry.profile import compute_reference_profile

NAME = "telemetry_size"
DESCRIPTION = "bytes per report (20 features + 1 output) at 1/100/1000 inferences; KLL k=200 baseline"
FEATURES = 20


def _kll_bytes(x: np.ndarray, y: np.ndarray) -> int:
    blobs = []
    for col in [*x.T, y]:
        k = kll_floats_sketch(200)
        k.update(np.ascontiguousarray(col, dtype=np.float32))
        blobs.append(k.serialize())
    raw = b"".join(blobs)
    return min(len(raw), len(zstandard.ZstdCompressor(level=3).compress(raw)))


def run() -> dict[str, float]:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100_000, FEATURES)).astype(np.float32)
    names = [f"f{i}" for i in range(FEATURES)]
    profile = compute_reference_profile(ref, names, outputs=ref[:, :4].sum(axis=1))
    out: dict[str, float] = {}
    for n in (1, 100, 1000):
        sizes, kll_sizes = [], []
        for rep in range(5):
            sk = TelemetrySketch(profile, "device-0001", "mlp", "1.0.0",
                                 resource_probe=lambda: (50_000_000, 1.0, 0.1))
            x = rng.normal(0.05 * rep, 1.0, size=(n, FEATURES)).astype(np.float32)
            y = x[:, :4].sum(axis=1)
            for i in range(n):
                sk.update(x[i : i + 1], y[i : i + 1], 0.0004 + 0.0001 * (i % 7))
            sizes.append(len(encode_report(sk.snapshot_and_reset())))
            kll_sizes.append(_kll_bytes(x, y))
        out[f"report_bytes_{n}"] = float(np.median(sizes))
        out[f"kll_bytes_{n}"] = float(np.median(kll_sizes))
    out["kll_over_report_ratio"] = out["kll_bytes_1000"] / out["report_bytes_1000"]
    return out
