"""A/B experiments: two versions split across a cohort, compared with a statistical test.

- Assignment is a stable hash: `sha256("<experiment>:<device>")` -> bucket 0..9999; buckets
  below `split_b x 10000` run version B. The same device always lands in the same arm, with
  no table needed to decide it (the table only records what was sent).
- Evidence per arm: requests and errors (error rate: two-proportion z-test), the latency
  histogram from telemetry (expanded to a representative sample: Mann-Whitney U), and any
  metric pushed as observations (Mann-Whitney U). Each metric has a goal (min or max).
- Recommendation: a winner when every significant metric (p < alpha, both arms at or above
  `min_samples`) favours the same arm; "conflicting" when they disagree; otherwise
  "inconclusive" with how many more samples per arm a test of the observed effect needs.

`ExperimentDriver` is the component that sends each device of a running experiment the
director document for its arm. Errors: `ExperimentRepo.create` raises FleetInputError,
NotFound and Conflict; `recommend` raises nothing for empty data (it says "inconclusive").
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import stats

from agent.contract.telemetry import latency_bucket_upper
from agent.logs import log_event
from fleet.db.rows import Row, decode_row, dumps
from fleet.devices.selector import parse_selector
from fleet.errors import Conflict, FleetError, FleetInputError, NotFound
from fleet.periodic import PeriodicRunner
from fleet.rollouts.records import RolloutRecords

if TYPE_CHECKING:
    from fleet.rollouts.controller import DesiredPublisher, DirectorIssuer, TargetSource
    from fleet.store import Store

logger = logging.getLogger("edgefleet.fleet.experiments")
BUCKETS = 10_000
MAX_SAMPLE = 5000  # per arm and metric, for the rank test
Goal = Literal["min", "max"]
DEFAULT_METRICS: dict[str, Goal] = {"error_rate": "min", "latency_ms": "min"}


def arm_of(experiment_id: str, device_id: str, split_b: float) -> Literal["a", "b"]:
    """The arm of a device: stable across restarts, independent between experiments."""
    digest = hashlib.sha256(f"{experiment_id}:{device_id}".encode()).digest()
    return "b" if int.from_bytes(digest[:8], "big") % BUCKETS < round(split_b * BUCKETS) else "a"


@dataclass
class ArmData:
    """Evidence for one arm: request/error counts and weighted samples per metric."""

    requests: int = 0
    errors: int = 0
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def sample(self, metric: str) -> np.ndarray:
        """A representative sample (evenly spaced order statistics when the data is large)."""
        pairs = self.samples.get(metric) or []
        if not pairs:
            return np.zeros(0)
        values = np.repeat([v for v, _ in pairs], [max(0, w) for _, w in pairs]).astype(float)
        values.sort()
        if values.size > MAX_SAMPLE:
            idx = np.linspace(0, values.size - 1, MAX_SAMPLE).round().astype(int)
            values = values[idx]
        return values

    def count(self, metric: str) -> int:
        if metric == "error_rate":
            return self.requests
        return sum(max(0, w) for _, w in self.samples.get(metric) or [])


@dataclass(frozen=True)
class MetricVerdict:
    metric: str
    goal: Goal
    test: str
    n_a: int
    n_b: int
    value_a: float | None  # error rate, or the median of the samples
    value_b: float | None
    p_value: float | None
    effect_size: float | None  # B - A for rates; rank-biserial r (P(B>A) - P(B<A)) otherwise
    winner: Literal["a", "b"] | None
    more_samples_needed: int
    p95_a: float | None = None  # 95th percentile of the samples (distribution metrics)
    p95_b: float | None = None


@dataclass(frozen=True)
class Recommendation:
    verdict: Literal["a", "b", "conflicting", "inconclusive"]
    summary: str
    metrics: list[MetricVerdict]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "summary": self.summary,
                "metrics": [asdict(m) for m in self.metrics]}


def two_proportion_z(x_a: int, n_a: int, x_b: int, n_b: int) -> tuple[float, float]:
    """(z, two-sided p) of H0: the two rates are equal (pooled standard error)."""
    if n_a == 0 or n_b == 0:
        return 0.0, 1.0
    pooled = (x_a + x_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (x_b / n_b - x_a / n_a) / se
    return z, float(2 * stats.norm.sf(abs(z)))


def samples_for_proportions(p_a: float, p_b: float, alpha: float, power: float = 0.8) -> int:
    """Per-arm sample size to detect p_a vs p_b (normal approximation); a large number if equal."""
    if abs(p_a - p_b) < 1e-12:
        return 10**9
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    bar = (p_a + p_b) / 2
    n = (za * math.sqrt(2 * bar * (1 - bar)) + zb * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b))) ** 2
    return math.ceil(n / (p_a - p_b) ** 2)


def samples_for_rank_test(r: float, alpha: float, power: float = 0.8) -> int:
    """Per-arm sample size for a rank test to detect rank-biserial `r` (Noether's formula)."""
    p = (r + 1) / 2  # P(B > A)
    if abs(p - 0.5) < 1e-9:
        return 10**9
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    return math.ceil((za + zb) ** 2 / (6 * (p - 0.5) ** 2))


def _better(goal: Goal, diff_b_minus_a: float) -> Literal["a", "b"]:
    return "b" if (diff_b_minus_a < 0) == (goal == "min") else "a"


def compare_metric(metric: str, goal: Goal, a: ArmData, b: ArmData, alpha: float,
                   min_samples: int) -> MetricVerdict:
    """Test one metric between the arms."""
    n_a, n_b = a.count(metric), b.count(metric)
    if metric == "error_rate":
        ra = a.errors / a.requests if a.requests else None
        rb = b.errors / b.requests if b.requests else None
        _z, p = two_proportion_z(a.errors, a.requests, b.errors, b.requests)
        effect = None if ra is None or rb is None else rb - ra
        need = samples_for_proportions(ra or 0.0, rb or 0.0, alpha) if effect is not None else min_samples
        test, va, vb = "two-proportion z", ra, rb
    else:
        xa, xb = a.sample(metric), b.sample(metric)
        va = float(np.median(xa)) if xa.size else None
        vb = float(np.median(xb)) if xb.size else None
        if xa.size and xb.size and not (np.all(xa == xa[0]) and np.all(xb == xa[0])):
            res = stats.mannwhitneyu(xb, xa, alternative="two-sided")
            p = float(res.pvalue)
            effect = 2 * float(res.statistic) / (xa.size * xb.size) - 1
        else:
            p, effect = 1.0, (0.0 if xa.size and xb.size else None)
        need = samples_for_rank_test(effect, alpha) if effect is not None else min_samples
        test = "Mann-Whitney U"
    enough = min(n_a, n_b) >= min_samples
    winner = _better(goal, effect) if enough and effect and p < alpha else None
    more = 0 if winner else max(0, max(need, min_samples) - min(n_a, n_b))
    p95 = [None, None] if metric == "error_rate" else [
        float(np.quantile(x, 0.95)) if x.size else None for x in (a.sample(metric), b.sample(metric))]
    return MetricVerdict(metric, goal, test, n_a, n_b, va, vb, None if effect is None else p, effect,
                         winner, more, p95[0], p95[1])


def recommend(a: ArmData, b: ArmData, metrics: dict[str, Goal], alpha: float = 0.05,
              min_samples: int = 100) -> Recommendation:
    """Compare the arms on every metric and say which one to keep (or why not yet)."""
    verdicts = [compare_metric(m, g, a, b, alpha, min_samples) for m, g in metrics.items()]
    winners = {v.winner for v in verdicts if v.winner}
    if len(winners) == 1:
        w = winners.pop()
        why = ", ".join(f"{v.metric} p={v.p_value:.3g} effect={v.effect_size:+.4g}"
                        for v in verdicts if v.winner and v.p_value is not None and v.effect_size is not None)
        return Recommendation(w, f"keep {w.upper()}: {why}", verdicts)
    if winners:
        return Recommendation("conflicting", "metrics disagree: " + ", ".join(
            f"{v.metric} favours {v.winner.upper()}" for v in verdicts if v.winner), verdicts)
    need = max((v.more_samples_needed for v in verdicts), default=min_samples)
    return Recommendation("inconclusive", f"inconclusive: need {need} more samples per arm", verdicts)


def latency_samples(counts: Sequence[int] | np.ndarray) -> list[tuple[float, int]]:
    """A telemetry latency histogram as (upper bound in ms, count) pairs."""
    return [(latency_bucket_upper(i) * 1e3, int(c)) for i, c in enumerate(np.asarray(counts)) if c]


class ExperimentRepo:
    """Experiments in the fleet database (migration 2 and 3 tables); every change audited."""

    JSON = ("metrics",)

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, name: str, version_a: str, version_b: str, selector: str, split_b: float,
               metrics: dict[str, Goal], min_samples: int, alpha: float, actor: str) -> Row:
        """Raises FleetInputError (bad split/alpha/metrics/selector), NotFound (version), Conflict."""
        if not 0 < split_b < 1:
            raise FleetInputError("split_b must be strictly between 0 and 1")
        if not 0 < alpha < 0.5 or min_samples < 1:
            raise FleetInputError("alpha must be in (0, 0.5) and min_samples >= 1")
        if not metrics or any(g not in ("min", "max") for g in metrics.values()):
            raise FleetInputError("metrics must map at least one name to 'min' or 'max'")
        parsed = parse_selector(selector)
        va, vb = (self.store.models.get_version_by_id(v) for v in (version_a, version_b))
        if va.model_name != vb.model_name or va.id == vb.id:
            raise Conflict("an experiment compares two different versions of the same model")
        for v in (va, vb):
            if not v.bundle_target:
                raise Conflict(f"{v.id} has no bundle in the repository")
        row: Row = {"id": "ex-" + secrets.token_hex(8), "name": name, "model_name": va.model_name,
                    "version_a": va.id, "version_b": vb.id, "selector": str(parsed), "split_b": split_b,
                    "metrics": dumps(metrics), "min_samples": min_samples, "alpha": alpha,
                    "state": "running", "created_at": self.store.now(), "created_by": actor,
                    "started_at": self.store.clock()}
        with self.store.tx() as db:
            db.table("experiments").insert(row)
            out = self.get(row["id"])
            self.store.audit.record(actor, "experiment.create", f"experiments/{row['id']}", None, out)
        return out

    def get(self, experiment_id: str) -> Row:
        with self.store.read() as db:
            rows = list(db.query("SELECT * FROM experiments WHERE id = ?", [experiment_id]))
        out = decode_row(rows[0], self.JSON) if rows else None
        if out is None:
            raise NotFound(f"experiment {experiment_id!r} not found")
        return out

    def list(self, cursor: str | None, limit: int) -> Any:
        return self.store.page("SELECT * FROM experiments WHERE 1", [], "id", cursor, limit, self.JSON)

    def stop(self, experiment_id: str, actor: str) -> Row:
        """Stop assigning devices (they keep their arm's version). Raises NotFound, Conflict."""
        with self.store.tx() as db:
            before = self.get(experiment_id)
            if before["state"] != "running":
                raise Conflict(f"experiment {experiment_id} is already {before['state']}")
            db.execute("UPDATE experiments SET state = 'stopped' WHERE id = ?", [experiment_id])
            self.store.audit.record(actor, "experiment.stop", f"experiments/{experiment_id}",
                                    {"state": "running"}, {"state": "stopped"})
            return self.get(experiment_id)

    def observe(self, experiment_id: str, arm: str, metric: str, values: Sequence[float], actor: str) -> int:
        """Add samples of `metric` for an arm. Raises NotFound, FleetInputError."""
        self.get(experiment_id)
        if arm not in ("a", "b"):
            raise FleetInputError("arm must be 'a' or 'b'")
        if not all(math.isfinite(v) for v in values):
            raise FleetInputError("observations must be finite numbers")
        with self.store.tx() as db:
            db.table("experiment_observations").insert_all(
                {"experiment_id": experiment_id, "arm": arm, "metric": metric, "value": float(v), "weight": 1}
                for v in values)
        return len(values)

    def devices(self, experiment_id: str) -> dict[str, str]:
        with self.store.read() as db:
            return {r["device_id"]: r["arm"] for r in db.query(
                "SELECT device_id, arm FROM experiment_devices WHERE experiment_id = ?", [experiment_id])}

    def data(self, exp: Row, telemetry: Any | None = None) -> tuple[ArmData, ArmData]:
        """Evidence per arm: pushed observations plus, when given, telemetry windows of each version."""
        arms = {"a": ArmData(), "b": ArmData()}
        with self.store.read() as db:
            for r in db.query("SELECT arm, metric, value, weight FROM experiment_observations "
                              "WHERE experiment_id = ?", [exp["id"]]):
                arms[r["arm"]].samples.setdefault(r["metric"], []).append((r["value"], r["weight"]))
        if telemetry is not None:
            for arm, vid in (("a", exp["version_a"]), ("b", exp["version_b"])):
                model, _, version = vid.partition(":")
                rep = telemetry.query_windows(model, version, since=exp["started_at"])
                if rep is not None:
                    arms[arm].requests += int(rep.requests)
                    arms[arm].errors += int(rep.errors)
                    arms[arm].samples.setdefault("latency_ms", []).extend(latency_samples(rep.latency_counts))
        return arms["a"], arms["b"]

    def recommendation(self, experiment_id: str, telemetry: Any | None = None) -> Recommendation:
        exp = self.get(experiment_id)
        a, b = self.data(exp, telemetry)
        return recommend(a, b, exp["metrics"], exp["alpha"], exp["min_samples"])


class ExperimentDriver:
    """Component: sends each matching device of a running experiment its arm's director document."""

    name = "experiment-driver"

    def __init__(self, store: Store, repository: TargetSource, signer: DirectorIssuer,
                 publisher: DesiredPublisher | None, tick_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.repo = ExperimentRepo(store)
        self.records = RolloutRecords(store)
        self.store, self.repository, self.signer, self.publisher = store, repository, signer, publisher
        self.tick_s, self.clock = tick_s, clock
        self._runner = PeriodicRunner(logger)
        self._runner.add(self.name, self.tick, tick_s)

    def tick(self) -> int:
        """Assign every not-yet-assigned matching device; returns how many documents went out."""
        if self.publisher is None:
            return 0
        sent = 0
        with self.store.read() as db:
            running = [r["id"] for r in db.query("SELECT id FROM experiments WHERE state = 'running'")]
        for eid in running:
            exp = self.repo.get(eid)
            done = self.repo.devices(eid)
            refs = {arm: self.repository.target_ref(
                        str(self.store.models.get_version_by_id(vid).bundle_target))
                    for arm, vid in (("a", exp["version_a"]), ("b", exp["version_b"]))}
            for dev in self.store.devices.ids_matching(parse_selector(exp["selector"])):
                if dev in done or self.records.open_entries_for(dev):  # a rollout holds it: wait
                    continue
                arm = arm_of(eid, dev, exp["split_b"])
                try:
                    doc = self.signer.issue(refs[arm], device_id=dev, rollout_id=eid,
                                            reason=f"experiment arm {arm}")
                    self.publisher.publish_desired(device_id=dev, document=doc)
                except FleetError as exc:
                    log_event(logger, "experiment.publish_failed", logging.WARNING, experiment=eid,
                              error=str(exc))
                    return sent
                with self.store.tx() as db:
                    db.table("experiment_devices").insert(
                        {"experiment_id": eid, "device_id": dev, "arm": arm, "assigned_at": self.clock()})
                sent += 1
        return sent

    def start(self) -> None:
        self._runner.start()

    def stop(self) -> None:
        self._runner.stop()
