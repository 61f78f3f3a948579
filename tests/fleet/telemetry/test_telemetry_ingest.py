"""Fleet ingest on a real SQLite file: validation, deduplication, windows, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zstandard

from agent.contract.manifest import ReferenceProfile
from agent.contract.telemetry import latency_bucket
from agent.contract.telemetry_codec import FLAG_ZSTD, encode_report
from agent.telemetry import TelemetrySketch
from fleet.registry.profile import compute_reference_profile
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from fleet.telemetry.window_queries import histogram_quantile
from tests.support.postgres import Backend

PROFILE = compute_reference_profile(np.random.default_rng(0).normal(size=(2000, 3)), ["a", "b", "c"],
                                    outputs=np.random.default_rng(1).normal(size=2000))


def _payloads(device: str, n: int, t0: float = 1000.0, version: str = "1.0.0",
              profile: ReferenceProfile = PROFILE, cohort: str = "") -> list[bytes]:
    clock = iter(np.arange(t0, t0 + 10 * (n + 1), 10.0).tolist())
    sk = TelemetrySketch(profile, device, "m", version, cohort=cohort, clock=lambda: next(clock),
                         resource_probe=lambda: (0, 0.0, 0.0))
    rng = np.random.default_rng(len(device))
    out = []
    for _ in range(n):
        x = rng.normal(size=(20, len(profile.features)))
        sk.update(x, x[:, 0], 0.002)
        out.append(encode_report(sk.snapshot_and_reset()))
    return out


def _store(path: Path, **kw: object) -> TelemetryStore:
    return TelemetryStore(path, IngestConfig(window_s=60.0, **kw),  # type: ignore[arg-type]
                          profiles=lambda m, v: PROFILE if v == "1.0.0" else None, clock=lambda: 2000.0)


@pytest.mark.integration
def test_reports_merge_into_windows_and_replays_are_dropped(backend: Backend) -> None:
    store = _store(backend.location("t.db"), flush_every=4)
    a, b = _payloads("dev-a", 9), _payloads("dev-b", 3, cohort="canary")
    assert [store.ingest(p) for p in a + b] == ["accepted"] * 12
    assert [store.ingest(p) for p in a[:3]] == ["duplicate"] * 3  # replayed offline queue
    merged = store.query_windows("m", "1.0.0")
    assert merged is not None and merged.requests == 12 and merged.features[0].n == 12 * 20
    windows = store.windows("m", "1.0.0", cohort="")
    # interval ends at 1010..1090 s: windows [960, 1020), [1020, 1080), [1080, 1140)
    assert [w["window_start"] for w in windows] == [960.0, 1020.0, 1080.0]
    assert [w["reports"] for w in windows] == [1, 6, 2] and windows[0]["devices"] == ["dev-a"]
    canary = store.query_windows("m", "1.0.0", cohort="canary")
    assert canary is not None and canary.requests == 3
    part = store.query_windows("m", "1.0.0", since=1020.0, until=1080.0)
    assert part is not None and part.requests == 6 + 2  # dev-b ended at 1010, 1020, 1030
    assert store.query_windows("m", "9.9.9") is None
    assert store.counters.accepted == 12 and store.counters.duplicates == 3


@pytest.mark.integration
def test_bad_payloads_are_counted_and_never_stop_the_ingester(backend: Backend) -> None:
    store = _store(backend.location("t.db"))
    good = _payloads("dev-a", 2)
    rng = np.random.default_rng(2)
    other = compute_reference_profile(rng.normal(size=(500, 3)), ["a", "b", "c"], bins=10)
    same_shape = compute_reference_profile(rng.normal(size=(2000, 3)), ["a", "b", "c"],
                                           outputs=rng.normal(size=2000))
    bomb = bytes([FLAG_ZSTD]) + zstandard.ZstdCompressor().compress(b"\x00" * (16 * 1024 * 1024))
    bad = [b"", b"\x00garbage", good[0][: len(good[0]) // 2], bomb, b"\x00" * 300_000,
           _payloads("dev-x", 1, version="2.0.0")[0],  # no profile for this version
           _payloads("dev-y", 1, profile=other)[0],  # binned by another profile
           _payloads("dev-z", 1, profile=same_shape)[0]]  # other edges, same shape: profile_id differs
    results = [store.ingest(p) for p in [good[0], *bad, good[1]]]
    assert results == ["accepted", *["rejected"] * len(bad), "accepted"]
    assert store.counters.rejected == len(bad)
    assert store.counters.reasons == {"malformed": 5, "unknown_version": 1, "profile_mismatch": 2}
    merged = store.query_windows("m", "1.0.0")
    assert merged is not None and merged.requests == 2


@pytest.mark.integration
def test_windows_and_seen_pairs_survive_a_restart(backend: Backend) -> None:
    db = backend.location("t.db")
    first = _payloads("dev-a", 6)
    store = _store(db)
    for p in first[:4]:
        store.ingest(p)
    store.close()
    again = _store(db)
    assert [again.ingest(p) for p in first] == ["duplicate"] * 4 + ["accepted"] * 2
    merged = again.query_windows("m", "1.0.0")
    assert merged is not None and merged.requests == 6
    assert again.windows("m", "1.0.0")[1]["reports"] == 6 - 1  # the same window, merged across runs


@pytest.mark.integration
def test_latency_quantiles_from_histograms_and_across_devices(backend: Backend) -> None:
    store = _store(backend.location("t.db"))
    for p in _payloads("dev-a", 3) + _payloads("dev-bb", 3):
        store.ingest(p)
    merged = store.query_windows("m", "1.0.0")
    assert merged is not None
    p50 = histogram_quantile(merged.latency_counts, 0.5)
    assert 0.002 <= p50 <= 0.002 * 2 ** (1 / 4) + 1e-12
    assert merged.latency_counts[latency_bucket(0.002)] == 6
    q = store.device_latency_quantiles("m", "1.0.0", [0.5, 0.99])
    assert q == pytest.approx([0.002, 0.002])
    assert np.isnan(histogram_quantile(np.zeros(4), 0.5))


@pytest.mark.integration
def test_ingest_from_several_threads_and_drift_of_the_merged_windows(backend: Backend) -> None:
    import threading

    store = _store(backend.location("t.db"), flush_every=7)
    batches = [_payloads(f"dev-{i}", 8) for i in range(4)]
    results: list[str] = []
    lock = threading.Lock()

    def feed(payloads: list[bytes]) -> None:
        for p in payloads:
            r = store.ingest(p)
            with lock:
                results.append(r)
            store.query_windows("m", "1.0.0")  # reads interleave with writes

    threads = [threading.Thread(target=feed, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count("accepted") == 32
    merged = store.query_windows("m", "1.0.0")
    assert merged is not None and merged.requests == 32
    verdict = store.drift("m", "1.0.0")
    assert verdict is not None and not verdict.dataset_drift and 0.0 <= verdict.drifted_share <= 1.0
    assert store.drift("m", "9.9.9") is None
