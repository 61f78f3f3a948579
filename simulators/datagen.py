"""Per-device input generators with configurable distributions and scheduled drift.

Why a schema plus a drift schedule: the drift scenario must know exactly which features drift,
for which cohort and from when, so that it can check the fleet's alert names those features
and nothing else. A `Schema` lists the features (normal, heavy-tailed Student-t, uniform, or
categorical integer codes); a `DriftSpec` changes one feature for some cohorts from a start
time on (mean shift in units of the feature's std, variance scale, or new category
probabilities), ramping in linearly over `ramp_s`. Every device gets its own seeded stream,
so a run is reproducible and devices are independent.

Errors: constructors raise `fleet.errors.FleetMisuseError` for inconsistent settings
(unknown feature, probabilities that do not sum to 1, negative scales).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fleet.errors import FleetMisuseError

Distribution = Literal["normal", "heavy_tailed", "uniform", "categorical"]
DriftKind = Literal["mean_shift", "variance", "category_shift"]


@dataclass(frozen=True)
class Feature:
    """One input column. Numeric: `mean`/`std` (`df` = Student-t degrees of freedom for
    `heavy_tailed`); categorical: integer codes `0..len(probs)-1` with probabilities `probs`."""

    name: str
    distribution: Distribution = "normal"
    mean: float = 0.0
    std: float = 1.0
    df: float = 3.0
    probs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.std < 0:
            raise FleetMisuseError(f"feature {self.name}: std must be >= 0")
        if self.distribution == "heavy_tailed" and self.df <= 2:
            raise FleetMisuseError(f"feature {self.name}: heavy_tailed needs df > 2 (finite variance)")
        if self.distribution == "categorical":
            _check_probs(self.name, self.probs)

    @property
    def categorical(self) -> bool:
        return self.distribution == "categorical"


def _check_probs(name: str, probs: Sequence[float]) -> None:
    if not probs or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise FleetMisuseError(f"feature {name}: categorical probabilities must be >= 0 and sum to 1")


@dataclass(frozen=True)
class DriftSpec:
    """Drift on one feature for `cohorts` (empty = every cohort) from `start_s` on.

    `amount`: for mean_shift, the shift in units of the feature's std; for variance, the
    factor applied to the std. `probs`: the new category probabilities for category_shift.
    """

    feature: str
    kind: DriftKind
    amount: float = 0.0
    probs: tuple[float, ...] = ()
    cohorts: frozenset[str] = frozenset()
    start_s: float = 0.0
    ramp_s: float = 0.0

    def weight(self, cohort: str, t: float) -> float:
        """How much of the drift applies at time `t` (0..1) for a device of `cohort`."""
        if self.cohorts and cohort not in self.cohorts:
            return 0.0
        if t < self.start_s:
            return 0.0
        if self.ramp_s <= 0:
            return 1.0
        return min(1.0, (t - self.start_s) / self.ramp_s)


@dataclass(frozen=True)
class Schema:
    """The ordered input columns of the model; `categorical_vocabulary` feeds the bundle builder."""

    features: tuple[Feature, ...]
    drifts: tuple[DriftSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise FleetMisuseError("feature names must be unique")
        by_name = {f.name: f for f in self.features}
        for d in self.drifts:
            feat = by_name.get(d.feature)
            if feat is None:
                raise FleetMisuseError(f"drift names unknown feature {d.feature!r}")
            if d.kind == "category_shift":
                if not feat.categorical:
                    raise FleetMisuseError(f"category_shift on numeric feature {d.feature!r}")
                _check_probs(d.feature, d.probs)
                if len(d.probs) != len(feat.probs):
                    raise FleetMisuseError(f"drift on {d.feature!r}: {len(feat.probs)} probabilities needed")
            elif feat.categorical:
                raise FleetMisuseError(f"{d.kind} on categorical feature {d.feature!r}")
            if d.kind == "variance" and d.amount <= 0:
                raise FleetMisuseError(f"variance drift on {d.feature!r}: amount must be > 0")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def categorical_vocabulary(self) -> dict[str, list[str]]:
        """`{name: ["0", "1", ...]}` for the categorical columns (the builder's `categorical`)."""
        return {f.name: [str(i) for i in range(len(f.probs))] for f in self.features if f.categorical}

    def with_drifts(self, *drifts: DriftSpec) -> Schema:
        return Schema(self.features, tuple(drifts))


def default_schema(n_features: int = 32, n_categorical: int = 4, n_heavy: int = 4) -> Schema:
    """The MLP's 32 inputs: mostly normal, a few heavy-tailed, the last few categorical codes."""
    feats: list[Feature] = []
    for j in range(n_features):
        name = f"f{j:02d}"
        if j >= n_features - n_categorical:
            feats.append(Feature(name, "categorical", probs=(0.5, 0.3, 0.15, 0.05)))
        elif j >= n_features - n_categorical - n_heavy:
            feats.append(Feature(name, "heavy_tailed", mean=0.0, std=1.0, df=4.0))
        else:
            feats.append(Feature(name, "normal", mean=0.1 * (j % 5), std=1.0 + 0.1 * (j % 3)))
    return Schema(tuple(feats))


def device_seed(base: int, device_id: str) -> int:
    """A stable per-device seed (independent of Python's hash randomisation)."""
    return base ^ int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big")


class DataGenerator:
    """Batches of float32 inputs for one device of one cohort, drift applied at time `t`."""

    def __init__(self, schema: Schema, cohort: str = "", seed: int = 0) -> None:
        self.schema = schema
        self.cohort = cohort
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int, t: float = 0.0) -> np.ndarray:
        """`(n, len(features))` float32 rows (categorical columns hold integer codes).

        Raises `FleetMisuseError` when `n` < 0.
        """
        if n < 0:
            raise FleetMisuseError("batch size must be >= 0")
        cols = [self._column(f, n, t) for f in self.schema.features]
        return np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((n, 0), np.float32)

    def _column(self, f: Feature, n: int, t: float) -> np.ndarray:
        shift, scale, probs = 0.0, 1.0, np.asarray(f.probs, dtype=np.float64)
        for d in self.schema.drifts:
            if d.feature != f.name:
                continue
            w = d.weight(self.cohort, t)
            if w == 0.0:
                continue
            if d.kind == "mean_shift":
                shift += w * d.amount * f.std
            elif d.kind == "variance":
                scale *= 1.0 + w * (d.amount - 1.0)
            else:
                probs = (1.0 - w) * probs + w * np.asarray(d.probs, dtype=np.float64)
        if f.categorical:
            return self.rng.choice(len(probs), size=n, p=probs / probs.sum()).astype(np.float64)
        if f.distribution == "normal":
            z = self.rng.standard_normal(n)
        elif f.distribution == "heavy_tailed":
            z = self.rng.standard_t(f.df, n) / np.sqrt(f.df / (f.df - 2.0))  # unit variance
        else:
            z = self.rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), n)  # unit variance
        return f.mean + shift + f.std * scale * z
