"""The device sketch: exact counts against the profile's bins, moments, categories, merging."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract.manifest import FeatureProfile, ReferenceProfile
from agent.contract.telemetry import LATENCY_BUCKETS, latency_bucket, merge_reports
from agent.errors import MisuseError
from agent.telemetry import TelemetrySketch
from fleet.registry.profile import compute_reference_profile


def _profile(seed: int = 0, d: int = 6) -> ReferenceProfile:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4000, d))
    return compute_reference_profile(x, [f"f{i}" for i in range(d)], outputs=x[:, :2] @ [[1.0], [2.0]])


def _sketch(profile: ReferenceProfile, **kw: object) -> TelemetrySketch:
    return TelemetrySketch(profile, "dev-1", "m", "1.0.0", clock=lambda: 100.0,
                           resource_probe=lambda: (1000, 1.0, 0.5), **kw)  # type: ignore[arg-type]


@pytest.mark.unit
def test_counts_and_moments_match_exact_binning_across_batch_sizes() -> None:
    prof = _profile()
    sk = _sketch(prof)
    rng = np.random.default_rng(7)
    rows = rng.normal(0.2, 1.3, size=(1500, 6)).astype(np.float32)
    sizes = [1, 3, 250, 700, 1, 545]
    start = 0
    for n in sizes:  # small batches go through the row buffer, large ones straight in
        sk.update(rows[start : start + n], rows[start : start + n, :2] @ np.array([[1.0], [2.0]]), 0.002)
        start += n
    rep = sk.snapshot_and_reset()
    assert rep.requests == len(sizes) and rep.errors == 0
    for j, f in enumerate(prof.features):
        col = rows[:, j].astype(np.float64)
        edges = np.asarray(f.edges)
        exact = np.bincount(np.searchsorted(edges, col, side="right"), minlength=len(edges) + 1)
        s = rep.features[j]
        assert np.array_equal(s.counts, exact)
        assert s.min == col.min() and s.max == col.max() and s.nan_count == 0
        assert s.sum == pytest.approx(col.sum()) and s.sum_sq == pytest.approx((col**2).sum())
    assert rep.outputs[0].n == 1500
    again = sk.snapshot_and_reset()
    assert again.seq == rep.seq + 1 and again.features[0].n == 0 and again.requests == 0


@pytest.mark.unit
def test_non_finite_values_are_counted_apart_and_out_of_range_lands_in_under_overflow() -> None:
    prof = _profile(d=2)
    sk = _sketch(prof)
    x = np.array([[np.nan, -1e9], [np.inf, 1e9], [-np.inf, 0.0], [0.5, 0.1]])
    sk.update(x, None, 0.001)
    f0, f1 = sk.snapshot_and_reset().features
    assert f0.nan_count == 3 and f0.n == 1 and f0.min == f0.max == 0.5 and f0.sum == 0.5
    assert f1.nan_count == 0 and f1.counts[0] == 1 and f1.counts[-1] == 1 and f1.n == 4


@pytest.mark.unit
def test_categorical_codes_vocabulary_and_bounded_unseen_items() -> None:
    prof = ReferenceProfile(features=[
        FeatureProfile(name="c", kind="categorical", vocabulary=["0", "1", "2"]),
        FeatureProfile(name="x", kind="numeric", edges=[0.0, 1.0, 2.0]),
    ])
    sk = _sketch(prof, frequent_k=4)
    codes = np.array([0, 1, 1, 2, 2, 2] + [9] * 50 + [7] * 20 + list(range(100, 130)) + [np.nan], float)
    x = np.column_stack([codes, np.full(len(codes), 0.5)])
    sk.update(x, None, 0.001)
    c = sk.snapshot_and_reset().features[0]
    assert list(c.counts) == [1, 2, 3, 50 + 20 + 30]
    assert c.nan_count == 1 and len(c.unseen) <= 4
    assert c.unseen["9"] >= 50 - c.unseen_error and c.unseen["7"] >= 20 - c.unseen_error


@pytest.mark.unit
def test_latency_errors_rejections_and_resources() -> None:
    sk = _sketch(_profile(d=2))
    sk.update(np.zeros((1, 2)), np.zeros((1, 1)), 0.004)
    sk.update(np.zeros((1, 2)), None, 0.5, error=True)
    sk.record_rejected(3)
    rep = sk.snapshot_and_reset()
    assert (rep.requests, rep.errors, rep.rejected) == (2, 1, 3)
    assert rep.latency_counts.sum() == 2 and rep.latency_counts.size == LATENCY_BUCKETS
    assert rep.latency_counts[latency_bucket(0.004)] == 1 and rep.latency_max_s == 0.5
    assert rep.outputs[0].n == 1  # the failed call's outputs are not folded
    assert rep.resources.rss_max_bytes == 1000 and rep.resources.cpu_user_s == 0.0


@pytest.mark.unit
def test_merging_two_intervals_equals_one_interval() -> None:
    prof = _profile()
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(200, 6))
    one, two = _sketch(prof), _sketch(prof)
    one.update(np.vstack([a, b]), None, 0.01)
    two.update(a, None, 0.01)
    r1 = two.snapshot_and_reset()
    two.update(b, None, 0.01)
    merged = merge_reports(r1, two.snapshot_and_reset())
    whole = one.snapshot_and_reset()
    for m, w in zip(merged.features, whole.features, strict=True):
        assert np.array_equal(m.counts, w.counts) and m.min == w.min and m.max == w.max
        assert m.sum == pytest.approx(w.sum)
    assert merged.requests == 2 and merged.merged_reports == 2


@pytest.mark.unit
def test_wrong_width_is_a_misuse() -> None:
    sk = _sketch(_profile(d=3))
    with pytest.raises(MisuseError, match="columns"):
        sk.update(np.zeros((2, 4)), None, 0.001)
    with pytest.raises(MisuseError, match="numeric"):
        sk.update(np.array([["a", "b", "c"]]), None, 0.001)
    with pytest.raises(MisuseError):
        TelemetrySketch(_profile(d=3), "", "m", "1.0.0")


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_counts_equal_exact_binning_for_any_values_and_batch_split(data: st.DataObject) -> None:
    prof = _profile(seed=4, d=3)
    values = st.one_of(st.floats(-6, 6), st.sampled_from([np.nan, np.inf, -np.inf, 0.0]),
                       st.sampled_from([e for f in prof.features for e in f.edges[:5]]))
    n = data.draw(st.integers(1, 700))
    rows = np.array(data.draw(st.lists(st.tuples(values, values, values), min_size=n, max_size=n)))
    sk = _sketch(prof)
    start = 0
    while start < n:
        step = data.draw(st.integers(1, n - start))
        sk.update(rows[start : start + step], None, 0.001)
        start += step
    rep = sk.snapshot_and_reset()
    for j, f in enumerate(prof.features):
        col = rows[:, j]
        finite = col[np.isfinite(col)]
        edges = np.asarray(f.edges)
        exact = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=len(edges) + 1)
        s = rep.features[j]
        assert np.array_equal(s.counts, exact) and s.nan_count == int((~np.isfinite(col)).sum())
        if finite.size:
            assert s.min == finite.min() and s.max == finite.max()
            assert s.sum == pytest.approx(finite.sum(), abs=1e-9)


def _edges() -> list[float]:
    """Every bucket's lower edge as the scalar function computes it, and its float neighbours."""
    from agent.contract.telemetry import LATENCY_BUCKETS_PER_OCTAVE, LATENCY_MIN_S

    out = []
    for i in range(LATENCY_BUCKETS + 2):
        e = LATENCY_MIN_S * 2.0 ** (i / LATENCY_BUCKETS_PER_OCTAVE)
        out += [np.nextafter(e, 0.0), e, np.nextafter(e, np.inf)]
    return out


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                          st.floats(min_value=1e-7, max_value=100.0),
                          st.sampled_from(_edges())), max_size=300))
def test_latency_buckets_in_arrays_are_exactly_one_call_per_value(values: list[float]) -> None:
    from agent.contract.telemetry import latency_bucket_counts

    want = np.zeros(LATENCY_BUCKETS, np.int64)
    for v in values:
        want[latency_bucket(v)] += 1
    np.testing.assert_array_equal(latency_bucket_counts(np.asarray(values, dtype=np.float64)), want)


@pytest.mark.unit
def test_a_batch_of_latencies_folds_as_one_update_per_call() -> None:
    rng = np.random.default_rng(5)
    lats = [*np.exp(rng.uniform(-12, 2, 300)).tolist(), 0.0, -1.0, float("nan"), float("inf"), *_edges()]
    x, y = rng.normal(size=(len(lats), 2)), rng.normal(size=(len(lats), 1))
    prof = _profile(d=2)
    one, many = _sketch(prof), _sketch(prof)
    for i, lat in enumerate(lats):
        one.update(x[i:i + 1], y[i:i + 1], lat)
    many.update_batch(x, y, lats)
    a, b = one.snapshot_and_reset(), many.snapshot_and_reset()
    np.testing.assert_array_equal(a.latency_counts, b.latency_counts)
    assert a.requests == b.requests == len(lats)
    assert a.latency_sum_s == pytest.approx(b.latency_sum_s) and a.latency_max_s == b.latency_max_s
