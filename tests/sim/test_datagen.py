"""Data generators: distributions, per-device streams, drift by cohort and time."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.errors import FleetMisuseError
from simulators.datagen import DataGenerator, DriftSpec, Feature, Schema, default_schema, device_seed


@pytest.mark.unit
def test_default_schema_matches_the_mlp_and_its_distributions() -> None:
    schema = default_schema()
    x = DataGenerator(schema, seed=1).batch(20_000)
    assert x.shape == (20_000, 32) and x.dtype == np.float32
    normal, heavy, cat = x[:, 0], x[:, 24], x[:, 31]
    assert abs(normal.mean()) < 0.05 and abs(normal.std() - 1.0) < 0.05
    assert abs(heavy.std() - 1.0) < 0.15
    # heavy tails: far more mass beyond 4 sigma than a normal has (6e-5)
    assert (np.abs(heavy) > 4).mean() > 10 * 6e-5
    assert set(np.unique(cat)) == {0.0, 1.0, 2.0, 3.0}
    assert abs((cat == 0).mean() - 0.5) < 0.02
    assert schema.categorical_vocabulary()["f31"] == ["0", "1", "2", "3"]


@pytest.mark.unit
def test_devices_get_independent_reproducible_streams() -> None:
    schema = default_schema()
    a1 = DataGenerator(schema, seed=device_seed(7, "dev-1")).batch(5)
    a2 = DataGenerator(schema, seed=device_seed(7, "dev-1")).batch(5)
    b = DataGenerator(schema, seed=device_seed(7, "dev-2")).batch(5)
    assert np.array_equal(a1, a2)
    assert not np.array_equal(a1, b)


@pytest.mark.unit
def test_drift_applies_only_to_its_cohort_feature_and_time() -> None:
    schema = default_schema().with_drifts(
        DriftSpec("f01", "mean_shift", amount=2.0, cohorts=frozenset({"eu"}), start_s=100),
        DriftSpec("f02", "variance", amount=3.0, cohorts=frozenset({"eu"}), start_s=100),
        DriftSpec(
            "f30", "category_shift", probs=(0.05, 0.15, 0.3, 0.5), cohorts=frozenset({"eu"}), start_s=100
        ),
    )
    base = default_schema()
    eu, us = DataGenerator(schema, "eu", seed=3), DataGenerator(schema, "us", seed=3)
    before, after, other = eu.batch(20_000, t=50), eu.batch(20_000, t=150), us.batch(20_000, t=150)
    f = base.features
    assert abs(before[:, 1].mean() - f[1].mean) < 0.05
    assert abs(after[:, 1].mean() - (f[1].mean + 2.0 * f[1].std)) < 0.06
    assert abs(after[:, 2].std() / f[2].std - 3.0) < 0.1
    assert abs((after[:, 30] == 3).mean() - 0.5) < 0.02
    assert abs(other[:, 1].mean() - f[1].mean) < 0.05  # the other cohort does not drift
    assert abs(after[:, 0].mean() - f[0].mean) < 0.05  # nor do the other features


@pytest.mark.unit
def test_drift_ramps_in_linearly() -> None:
    d = DriftSpec("x", "mean_shift", amount=4.0, start_s=10, ramp_s=20)
    assert d.weight("any", 5) == 0.0
    assert d.weight("any", 20) == pytest.approx(0.5)
    assert d.weight("any", 40) == 1.0
    g = DataGenerator(Schema((Feature("x", std=1.0),), (d,)), seed=0)
    assert abs(g.batch(40_000, t=20)[:, 0].mean() - 2.0) < 0.05


@pytest.mark.unit
@pytest.mark.parametrize(
    "build",
    [
        lambda: Feature("c", "categorical", probs=(0.5, 0.4)),
        lambda: Feature("x", std=-1),
        lambda: Feature("x", "heavy_tailed", df=2),
        lambda: Schema((Feature("x"),), (DriftSpec("y", "mean_shift", 1.0),)),
        lambda: Schema((Feature("x"),), (DriftSpec("x", "category_shift", probs=(1.0,)),)),
        lambda: Schema((Feature("c", "categorical", probs=(1.0,)),), (DriftSpec("c", "mean_shift", 1.0),)),
        lambda: Schema((Feature("x"),), (DriftSpec("x", "variance", 0.0),)),
        lambda: Schema((Feature("x"), Feature("x"))),
    ],
)
def test_inconsistent_settings_are_refused(build: object) -> None:
    with pytest.raises(FleetMisuseError):
        build()  # type: ignore[operator]
