"""Per-device telemetry totals on real SQLite and PostgreSQL: what ingest adds, what a replay does not add,
that they commit with the windows, and the histogram-bound latency figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.contract.telemetry import LATENCY_BUCKETS, latency_bucket, latency_bucket_upper
from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.db.session import Db
from fleet.registry.profile import compute_reference_profile
from fleet.telemetry.device_totals import DeviceTotalsTable, latency_totals
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from tests.support.postgres import Backend

PROFILE = compute_reference_profile(np.random.default_rng(0).normal(size=(2000, 3)), ["a", "b", "c"],
                                    outputs=np.random.default_rng(1).normal(size=2000))


def _reports(device: str, n: int, latency_s: float, errors_every: int, version: str = "1.0.0",
             t0: float = 1000.0) -> list[bytes]:
    """`n` reports of 10 requests each, 10 s apart, every `errors_every`-th request failing."""
    clock = iter(np.arange(t0, t0 + 10 * (n + 1), 10.0).tolist())
    sk = TelemetrySketch(PROFILE, device, "m", version, clock=lambda: next(clock),
                         resource_probe=lambda: (0, 0.0, 0.0))
    out, i = [], 0
    for _ in range(n):
        for _ in range(10):
            x = np.zeros((1, 3))
            sk.update(x, x[:, 0], latency_s, error=i % errors_every == 0)
            i += 1
        out.append(encode_report(sk.snapshot_and_reset()))
    return out


def _store(path: Path, **kw: object) -> TelemetryStore:
    return TelemetryStore(path, IngestConfig(window_s=60.0, **kw),  # type: ignore[arg-type]
                          profiles=lambda m, v: PROFILE, clock=lambda: 2000.0)


@pytest.mark.unit
def test_latency_totals_count_each_request_at_its_bucket_bound() -> None:
    counts = np.zeros(LATENCY_BUCKETS, np.int64)
    counts[latency_bucket(0.002)], counts[-1] = 3, 1  # the last bucket has no upper bound
    n, total = latency_totals(counts)
    upper = latency_bucket_upper(latency_bucket(0.002)) * 1e3
    assert n == 4 and total == pytest.approx(3 * upper + latency_bucket_upper(LATENCY_BUCKETS - 2) * 1e3)
    assert 2.0 <= upper < 2.0 * 2 ** 0.25  # the bound overstates by less than one bucket width


@pytest.mark.integration
def test_each_accepted_report_adds_to_its_device_once(backend: Backend) -> None:
    store = _store(backend.location("t.db"), flush_every=3)
    a = _reports("dev-a", 9, 0.002, errors_every=5)  # 90 requests, 18 errors, ends 1010..1090
    b = _reports("dev-b", 4, 0.010, errors_every=2, t0=1040.0)  # 40 requests, 20 errors
    assert {store.ingest(p) for p in a + b} == {"accepted"}
    # replays before and after a flush (offline queue, QoS 1 redelivery) add nothing
    assert [store.ingest(p) for p in a[:2] + b[-1:]] == ["duplicate"] * 3
    store.flush()
    assert [store.ingest(p) for p in a[-2:]] == ["duplicate"] * 2
    totals = {t.device_id: t for t in store.device_totals("m", "1.0.0")}
    assert set(totals) == {"dev-a", "dev-b"}
    da, db = totals["dev-a"], totals["dev-b"]
    assert (da.requests, da.errors, da.latency_count) == (90, 18, 90)
    assert (db.requests, db.errors, db.latency_count) == (40, 20, 40)
    assert da.latency_mean_ms == pytest.approx(latency_bucket_upper(latency_bucket(0.002)) * 1e3)
    assert db.latency_mean_ms == pytest.approx(latency_bucket_upper(latency_bucket(0.010)) * 1e3)
    assert (da.windows, da.first_window, da.last_window) == (3, 960.0, 1080.0)
    # the requests agree with the merged windows, which they refine by device
    merged = store.query_windows("m", "1.0.0")
    assert merged is not None and merged.requests == da.requests + db.requests
    since = {t.device_id: t.requests for t in store.device_totals("m", "1.0.0", since=1080.0)}
    assert since == {"dev-a": 20, "dev-b": 10}  # reports ending at 1080, 1090; 1080
    assert store.device_totals("m", "9.9.9") == []
    store.close()
    again = _store(backend.location("t.db"))  # stored, not only buffered
    assert [t.requests for t in again.device_totals("m", "1.0.0")] == [90, 40]
    assert again.ingest(a[0]) == "duplicate"
    assert [t.requests for t in again.device_totals("m", "1.0.0")] == [90, 40]
    again.close()


@pytest.mark.integration
def test_totals_commit_with_the_windows_or_not_at_all(backend: Backend, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    store = _store(backend.location("t.db"))
    for p in _reports("dev-a", 3, 0.002, errors_every=3):
        assert store.ingest(p) == "accepted"
    real = DeviceTotalsTable.write

    def write_then_fail(self: DeviceTotalsTable, db: Db) -> int:
        real(self, db)
        raise RuntimeError("disk full")

    monkeypatch.setattr(DeviceTotalsTable, "write", write_then_fail)
    with pytest.raises(RuntimeError):
        store.flush()
    monkeypatch.setattr(DeviceTotalsTable, "write", real)
    with store.database.read() as db:
        rows = db.scalar("SELECT COUNT(*) FROM telemetry_windows")
        assert rows == 0 and db.scalar("SELECT COUNT(*) FROM telemetry_device_totals") == 0
    # the next flush writes what is still buffered, once
    assert [(t.requests, t.errors) for t in store.device_totals("m", "1.0.0")] == [(30, 10)]
    merged = store.query_windows("m", "1.0.0")
    assert merged is not None and merged.requests == 30
    store.close()
