"""Reference profiles: percentile edges, reference counts, discrete data, categorical columns."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.errors import FleetInputError
from fleet.registry.profile import compute_reference_profile


@pytest.mark.unit
def test_numeric_edges_are_percentiles_and_counts_cover_every_row() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(5000, 2))
    prof = compute_reference_profile(x, ["a", "b"], outputs=x[:, 0] * 2, bins=50)
    a = prof.features[0]
    assert a.kind == "numeric" and len(a.edges) == 51 and len(a.reference_counts) == 50
    assert sum(a.reference_counts) == 5000 and max(a.reference_counts) <= 101
    assert a.edges[0] == x[:, 0].min() and a.edges[-1] > x[:, 0].max()
    assert a.mean == pytest.approx(x[:, 0].mean()) and a.std == pytest.approx(x[:, 0].std())
    assert prof.outputs[0].name == "output_0" and prof.sample_count == 5000


@pytest.mark.unit
def test_discrete_data_gets_one_bin_per_value() -> None:
    x = np.repeat(np.arange(5.0), [100, 300, 50, 400, 150]).reshape(-1, 1)
    f = compute_reference_profile(x, ["k"]).features[0]
    assert f.edges[:5] == [0.0, 1.0, 2.0, 3.0, 4.0] and len(f.edges) == 6
    assert f.reference_counts == [100, 300, 50, 400, 150]


@pytest.mark.unit
def test_categorical_columns_from_strings_and_codes() -> None:
    x = np.array([[1.0, "red"], [2.0, "blue"], [np.nan, "red"], [4.0, None]], dtype=object)
    prof = compute_reference_profile(x, ["n", "colour"], categorical={"colour": []})
    num, cat = prof.features
    assert num.reference_counts == [1, 1, 1] and cat.vocabulary == ["red", "blue"]
    assert cat.reference_counts == [2, 1, 0]
    codes = np.array([[0], [1], [1], [7]], dtype=np.float32)
    cat2 = compute_reference_profile(codes, ["c"], categorical={"c": ["0", "1", "2"]}).features[0]
    assert cat2.reference_counts == [1, 2, 0, 1]  # "7" is outside the given vocabulary


@pytest.mark.unit
def test_bad_reference_data_is_refused() -> None:
    with pytest.raises(FleetInputError, match="names"):
        compute_reference_profile(np.zeros((3, 2)), ["a"])
    with pytest.raises(FleetInputError, match="finite"):
        compute_reference_profile(np.full((3, 1), np.nan), ["a"])
    with pytest.raises(FleetInputError, match="not numeric"):
        compute_reference_profile(np.array([["x"]], dtype=object), ["a"])
    with pytest.raises(FleetInputError, match="bins"):
        compute_reference_profile(np.zeros((3, 1)), ["a"], bins=0)
