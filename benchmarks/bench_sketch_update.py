"""Cost of folding inference rows into the telemetry sketch vs datasketches' KLL.

21 values per row (20 input features + 1 output), 100 reference bins each. Rows are folded in
batches of 1,000 (`TelemetrySketch.update`) and, as the serving path does it, one row per
call (rows buffered, folded 512 at a time). Baseline in the same run: 21
`kll_floats_sketch(200)`, each updated with its column's values as one numpy array per
batch (datasketches' vectorised update). Goal: `sketch_vs_kll_ratio` <= 1.5.
"""

from __future__ import annotations

import time

import numpy as np
from datasketches import kll_floats_sketch

from agent.telemetry import TelemetrySketch
from fleet.registry.profile import compute_reference_profile

NAME = "sketch_update"
DESCRIPTION = "us per 21-value row folded (batches of 1000, and 1 row per call) vs KLL k=200 vectorised"
BATCH = 1000
BATCHES = 60


def _best(fn: object, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def run() -> dict[str, float]:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50_000, 20)).astype(np.float32)
    prof = compute_reference_profile(ref, [f"f{i}" for i in range(20)], outputs=ref[:, :3].sum(axis=1))
    xs = [rng.normal(size=(BATCH, 20)).astype(np.float32) for _ in range(BATCHES)]
    ys = [x[:, :3].sum(axis=1) for x in xs]
    sketch = TelemetrySketch(prof, "d", "m", "1.0.0", resource_probe=lambda: (0, 0.0, 0.0))
    klls = [kll_floats_sketch(200) for _ in range(21)]

    def fold_sketch() -> None:
        for x, y in zip(xs, ys, strict=True):
            sketch.update(x, y, 0.001)

    def fold_kll() -> None:
        for x, y in zip(xs, ys, strict=True):
            cols = np.ascontiguousarray(x.T)
            for j in range(20):
                klls[j].update(cols[j])
            klls[20].update(y)

    rows1 = xs[0][:400]
    out1 = ys[0][:400]

    def fold_rows() -> None:
        for i in range(rows1.shape[0]):
            sketch.update(rows1[i : i + 1], out1[i : i + 1], 0.001)

    n = BATCH * BATCHES
    t_sketch = _best(fold_sketch) / n * 1e6
    t_kll = _best(fold_kll) / n * 1e6
    t_row = _best(fold_rows) / rows1.shape[0] * 1e6
    sketch.snapshot_and_reset()
    return {
        "sketch_update_us_per_row": t_sketch,
        "kll_update_us_per_row": t_kll,
        "sketch_vs_kll_ratio": t_sketch / t_kll,
        "sketch_update_us_per_single_row_call": t_row,
    }
