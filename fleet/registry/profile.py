"""Reference profiles: the bin edges, vocabularies and reference counts a bundle carries.

The agent bins its telemetry against these edges and the fleet measures drift by comparing
the devices' counts with the reference counts, so neither side needs the raw training data.

Conventions (shared with `agent.contract.telemetry`):

- Numeric feature: `edges` are the reference data's percentiles (`inverted_cdf`, i.e. real
  data values) over `bins` equal-mass steps, deduplicated (discrete data gets fewer bins),
  with the last edge set just above the reference maximum (`nextafter(max, +inf)`). Bins are
  half-open `[edges[i], edges[i+1])`; `reference_counts[i]` counts bin `i`
  (`len(edges) - 1` entries). Values below `edges[0]` or at/above `edges[-1]` are the
  device's underflow/overflow counts.
- Categorical feature: `vocabulary` lists the known categories as labels
  (`agent.contract.telemetry.category_labels`: integers render as `"3"`, strings as is);
  `reference_counts` has `len(vocabulary) + 1` entries, the last counting values outside the
  vocabulary (non-zero only when a vocabulary was given or capped).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from agent.contract.manifest import FeatureProfile, ReferenceProfile
from agent.contract.telemetry import category_labels
from fleet.errors import FleetInputError

MAX_BINS = 1024
MAX_VOCABULARY = 4096


def _numeric_profile(name: str, column: np.ndarray, bins: int) -> FeatureProfile:
    try:
        values = np.asarray(column, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FleetInputError(f"feature {name!r}: not numeric ({exc}); list it in `categorical`") from None
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise FleetInputError(f"feature {name!r}: no finite reference values")
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[:-1], method="inverted_cdf")
    edges = np.unique(quantiles)
    vmax = float(values.max())
    edges = np.append(edges[edges <= vmax], np.nextafter(vmax, np.inf))
    # Bins are [e_i, e_{i+1}); side="right" puts a value equal to an edge in the bin it opens.
    idx = np.searchsorted(edges, values, side="right") - 1
    counts = np.bincount(idx, minlength=len(edges) - 1)[: len(edges) - 1]
    return FeatureProfile(
        name=name,
        kind="numeric",
        edges=[float(e) for e in edges],
        mean=float(values.mean()),
        std=float(values.std()),
        reference_counts=[int(c) for c in counts],
    )


def _categorical_profile(name: str, column: np.ndarray, vocabulary: list[str]) -> FeatureProfile:
    labels = category_labels(column)
    freq = Counter(labels.tolist())
    freq.pop("", None)  # NaN/None render as "" and are not a category
    if not vocabulary:
        vocabulary = [label for label, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]
        vocabulary = vocabulary[:MAX_VOCABULARY]
    if len(vocabulary) > MAX_VOCABULARY or len(set(vocabulary)) != len(vocabulary):
        raise FleetInputError(f"feature {name!r}: vocabulary must be unique and <= {MAX_VOCABULARY}")
    if not vocabulary:
        raise FleetInputError(f"feature {name!r}: no reference categories")
    counts = [freq.get(v, 0) for v in vocabulary]
    other = sum(freq.values()) - sum(counts)
    return FeatureProfile(
        name=name, kind="categorical", vocabulary=list(vocabulary), reference_counts=[*counts, other]
    )


def _profiles(
    data: np.ndarray, names: list[str], bins: int, categorical: dict[str, list[str]], what: str
) -> list[FeatureProfile]:
    if data.ndim == 1:
        data = data.reshape(-1, 1)
    if data.ndim != 2 or data.shape[1] != len(names):
        raise FleetInputError(f"{what}: array shape {data.shape} does not match {len(names)} names")
    if len(set(names)) != len(names):
        raise FleetInputError(f"{what}: names must be unique")
    return [
        _categorical_profile(n, data[:, j], list(categorical[n]))
        if n in categorical
        else _numeric_profile(n, data[:, j], bins)
        for j, n in enumerate(names)
    ]


def compute_reference_profile(
    features: np.ndarray,
    feature_names: list[str],
    outputs: np.ndarray | None = None,
    output_names: list[str] | None = None,
    bins: int = 100,
    categorical: dict[str, list[str]] | None = None,
    input_name: str | None = None,
) -> ReferenceProfile:
    """Profile reference (training/validation) data for the bundle manifest.

    `features` is `(n_rows, len(feature_names))`, one column per name. A column whose name is
    a key of `categorical` is categorical: its values may be strings (object/str array) or
    integer codes in a numeric array; the dict value is its vocabulary (labels as strings),
    or `[]` to take every category seen, most frequent first. Every other column is numeric
    (NaN/inf ignored). `outputs` (`(n_rows, k)` or `(n_rows,)`) is profiled the same way,
    named by `output_names` (default `output_0..`); `categorical` applies to outputs too.

    Raises `FleetInputError` on a shape/name mismatch, a non-numeric numeric column, a column
    with no finite values, or a bad vocabulary.
    """
    if not 1 <= bins <= MAX_BINS - 1:
        raise FleetInputError(f"bins must be in 1..{MAX_BINS - 1}, got {bins}")
    categorical = dict(categorical or {})
    features = np.asarray(features)
    feats = _profiles(features, list(feature_names), bins, categorical, "features")
    outs: list[FeatureProfile] = []
    if outputs is not None:
        outputs = np.asarray(outputs)
        if outputs.shape[0] != features.shape[0]:
            raise FleetInputError("outputs and features must have the same number of rows")
        k = 1 if outputs.ndim == 1 else outputs.shape[1]
        names = list(output_names) if output_names is not None else [f"output_{i}" for i in range(k)]
        outs = _profiles(outputs, names, bins, categorical, "outputs")
    return ReferenceProfile(
        input_name=input_name, features=feats, outputs=outs, sample_count=int(features.shape[0])
    )
