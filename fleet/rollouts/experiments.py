"""A/B experiments: two versions split across a cohort, judged by device, valid at any read.

- Assignment is a stable hash: `sha256("<experiment>:<device>")` -> bucket 0..9999; buckets
  below `split_b x 10000` run version B. The same device always lands in the same arm, with
  no table needed to decide it (the table only records what was sent).
- Evidence per arm: each device's requests, errors and latency from telemetry (per-device
  totals of the arm's version since the start; once devices are assigned, only the devices of
  that arm count), plus any metric pushed as observations (which carry no device). Each metric
  has a goal (min or max).
- Verdicts (fleet/rollouts/experiment_verdicts.py): device-level always-valid tests, Bonferroni
  across the metrics, no verdict below `min_devices` per arm. The running state of each
  metric's sequential test is kept in `experiment_sequential` (migration 5), so a verdict
  reached once never flips back however often the experiment is read.
- The per-request two-proportion z-test below is no longer used for verdicts: it stays as the
  baseline the calibration benchmark compares against (benchmarks/bench_ab_calibration.py).

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
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from scipy import stats

from agent.contract.telemetry import latency_bucket_upper
from agent.logs import log_event
from fleet.db.rows import Row, decode_row, dumps
from fleet.devices.selector import parse_selector
from fleet.errors import Conflict, FleetError, FleetInputError, NotFound
from fleet.periodic import PeriodicRunner
from fleet.rollouts.experiment_verdicts import ArmData, Goal, Recommendation, SequentialState, recommend
from fleet.rollouts.records import RolloutRecords
from fleet.telemetry.device_totals import DeviceVersionTotals

if TYPE_CHECKING:
    from fleet.rollouts.controller_ports import DesiredPublisher, DirectorIssuer, TargetSource
    from fleet.store import Store

logger = logging.getLogger("edgefleet.fleet.experiments")
BUCKETS = 10_000
DEFAULT_METRICS: dict[str, Goal] = {"error_rate": "min", "latency_ms": "min"}
DEFAULT_MIN_DEVICES = 10


class ExperimentTelemetry(Protocol):
    """What the recommendation reads from telemetry (`fleet.telemetry.ingest.TelemetryStore`)."""

    def device_totals(self, model: str, version: str, since: float | None = None
                      ) -> list[DeviceVersionTotals]: ...

    def query_windows(self, model: str, version: str, cohort: str | None = None,
                      since: float | None = None, until: float | None = None) -> Any: ...


def arm_of(experiment_id: str, device_id: str, split_b: float) -> Literal["a", "b"]:
    """The arm of a device: stable across restarts, independent between experiments."""
    digest = hashlib.sha256(f"{experiment_id}:{device_id}".encode()).digest()
    return "b" if int.from_bytes(digest[:8], "big") % BUCKETS < round(split_b * BUCKETS) else "a"


def two_proportion_z(x_a: int, n_a: int, x_b: int, n_b: int) -> tuple[float, float]:
    """(z, two-sided p) of H0: the two rates are equal (pooled standard error). Per request:
    the baseline the benchmark measures, not a valid test of an experiment's arms."""
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


def latency_samples(counts: Sequence[int] | np.ndarray) -> list[tuple[float, int]]:
    """A telemetry latency histogram as (upper bound in ms, count) pairs."""
    return [(latency_bucket_upper(i) * 1e3, int(c)) for i, c in enumerate(np.asarray(counts)) if c]


class ExperimentRepo:
    """Experiments in the fleet database (migrations 2 to 4); every change audited."""

    JSON = ("metrics", "taus")

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, name: str, version_a: str, version_b: str, selector: str, split_b: float,
               metrics: dict[str, Goal], min_samples: int, alpha: float, actor: str, *,
               min_devices: int = DEFAULT_MIN_DEVICES, taus: dict[str, float] | None = None) -> Row:
        """`min_devices`: devices per arm before any verdict (a variance needs at least 2);
        `taus`: the effect of interest per metric (the sequential test's mixing scale; defaults
        in experiment_verdicts.default_tau). Raises FleetInputError (bad split/alpha/metrics/
        selector/min_devices/taus), NotFound (version), Conflict."""
        if not 0 < split_b < 1:
            raise FleetInputError("split_b must be strictly between 0 and 1")
        if not 0 < alpha < 0.5 or min_samples < 1:
            raise FleetInputError("alpha must be in (0, 0.5) and min_samples >= 1")
        if not metrics or any(g not in ("min", "max") for g in metrics.values()):
            raise FleetInputError("metrics must map at least one name to 'min' or 'max'")
        if min_devices < 2:
            raise FleetInputError("min_devices must be at least 2 (a variance needs two devices)")
        taus = dict(taus or {})
        if any(m not in metrics or not (math.isfinite(t) and t > 0) for m, t in taus.items()):
            raise FleetInputError("taus must give a positive finite effect for metrics of the experiment")
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
                    "min_devices": min_devices, "taus": dumps(taus),
                    "state": "running", "created_at": self.store.now(), "created_by": actor,
                    "started_at": self.store.clock()}
        with self.store.tx() as db:
            db.insert("experiments", row)
            out = self.get(row["id"])
            self.store.audit.record(actor, "experiment.create", f"experiments/{row['id']}", None, out)
        return out

    def get(self, experiment_id: str) -> Row:
        with self.store.read() as db:
            found = db.one("SELECT * FROM experiments WHERE id = :id", {"id": experiment_id})
        out = decode_row(found, self.JSON) if found else None
        if out is None:
            raise NotFound(f"experiment {experiment_id!r} not found")
        return out

    def list(self, cursor: str | None, limit: int) -> Any:
        return self.store.page("SELECT * FROM experiments WHERE TRUE", {}, "id", cursor, limit, self.JSON)

    def stop(self, experiment_id: str, actor: str) -> Row:
        """Stop assigning devices (they keep their arm's version). Raises NotFound, Conflict."""
        with self.store.tx() as db:
            before = self.get(experiment_id)
            if before["state"] != "running":
                raise Conflict(f"experiment {experiment_id} is already {before['state']}")
            db.execute("UPDATE experiments SET state = 'stopped' WHERE id = :id", {"id": experiment_id})
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
            db.insert(
                "experiment_observations", [{"experiment_id": experiment_id, "arm": arm, "metric": metric,
                                             "value": float(v), "weight": 1}
                                            for v in values])
        return len(values)

    def devices(self, experiment_id: str) -> dict[str, str]:
        with self.store.read() as db:
            return {r["device_id"]: r["arm"] for r in db.query(
                "SELECT device_id, arm FROM experiment_devices WHERE experiment_id = :id",
                {"id": experiment_id})}

    def data(self, exp: Row, telemetry: ExperimentTelemetry | None = None) -> tuple[ArmData, ArmData]:
        """Evidence per arm: pushed observations plus, when given, each device's telemetry totals
        of the arm's version since the start. Once the experiment has assigned devices, an arm
        counts only its own devices (a device of arm B reporting A's version before it switched
        is not evidence for A). The merged windows give the arms' latency histograms (p95)."""
        arms = {"a": ArmData(), "b": ArmData()}
        with self.store.read() as db:
            for r in db.query("SELECT arm, metric, value, weight FROM experiment_observations "
                              "WHERE experiment_id = :id", {"id": exp["id"]}):
                arms[r["arm"]].samples.setdefault(r["metric"], []).append((r["value"], r["weight"]))
        if telemetry is None:
            return arms["a"], arms["b"]
        assigned = self.devices(exp["id"])
        for arm, vid in (("a", exp["version_a"]), ("b", exp["version_b"])):
            model, _, version = vid.partition(":")
            data = arms[arm]
            data.devices = [d for d in telemetry.device_totals(model, version, since=exp["started_at"])
                            if not assigned or assigned.get(d.device_id) == arm]
            data.requests = sum(d.requests for d in data.devices)
            data.errors = sum(d.errors for d in data.devices)
            rep = telemetry.query_windows(model, version, since=exp["started_at"])
            if rep is not None:
                data.latency_histogram = latency_samples(rep.latency_counts)
        return arms["a"], arms["b"]

    def sequential_state(self, experiment_id: str) -> dict[str, SequentialState]:
        """Each metric's running always-valid p-value, confidence sequence and tau so far."""
        with self.store.read() as db:
            return {r["metric"]: SequentialState(r["p_value"], r["ci_low"], r["ci_high"], r["tau"])
                    for r in db.query("SELECT * FROM experiment_sequential WHERE experiment_id = :id",
                                      {"id": experiment_id})}

    def recommendation(self, experiment_id: str, telemetry: ExperimentTelemetry | None = None
                       ) -> Recommendation:
        """Read the evidence, continue each metric's sequential test from its stored state and
        store the new state, in one transaction so that concurrent reads cannot lose a step."""
        exp = self.get(experiment_id)
        a, b = self.data(exp, telemetry)
        with self.store.tx() as db:
            rec = recommend(a, b, exp["metrics"], exp["alpha"], exp["min_samples"],
                            exp.get("min_devices") or DEFAULT_MIN_DEVICES, exp.get("taus") or {},
                            self.sequential_state(experiment_id))
            db.upsert(
                "experiment_sequential", [{"experiment_id": experiment_id, "metric": v.metric,
                                           "p_value": st.p_value,
                  "ci_low": st.ci_low, "ci_high": st.ci_high, "tau": st.tau, "updated_at": self.store.clock()}
                                          for v in rec.metrics if (st := v.state()) is not None],
                key=("experiment_id", "metric"))
        return rec


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
        self.active: Callable[[], bool] = lambda: True  # only the leader assigns (`fleet.cluster.leader`)

    def tick(self) -> int:
        """Assign every not-yet-assigned matching device; returns how many documents went out."""
        if self.publisher is None or not self.active():
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
                    db.insert(
                        "experiment_devices", {"experiment_id": eid, "device_id": dev, "arm": arm,
                                               "assigned_at": self.clock()})
                sent += 1
        return sent

    def start(self) -> None:
        self._runner.start()

    def stop(self) -> None:
        self._runner.stop()
