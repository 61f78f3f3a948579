"""Device-level, always-valid experiment verdicts over simulated device-correlated telemetry,
through the real TelemetryStore (encode, ingest, dedup, flush, per-device totals) and the real
ExperimentRepo over SQLite, read after every window as an operator or controller would.

Each device has its own error rate and its own typical latency (same site, same sensor), so
requests from one device are correlated: exactly the data on which the per-request tests the
experiments used before (two-proportion z, Mann-Whitney U over requests) declare winners that
are not there. Those old tests are computed beside, from the same store, to show it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy import stats

from agent.contract.telemetry import LATENCY_BUCKETS, TelemetryReport, latency_bucket
from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.rollouts.experiment_verdicts import Goal
from fleet.rollouts.experiments import ExperimentRepo, latency_samples, two_proportion_z
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.ingest import TelemetryStore
from tests.support.fakes import DIGEST, FakeClock
from tests.support.postgres import Backend
from tests.support.telemetry import T0, small_profile

pytestmark = pytest.mark.integration
PROFILE = small_profile()
METRICS: dict[str, Goal] = {"error_rate": "min", "latency_ms": "min"}


@dataclass
class Arm:
    version: str
    devices: list[str]
    rates: np.ndarray  # each device's own error rate
    typical_s: np.ndarray  # each device's own typical latency


def _arm(rng: np.random.Generator, version: str, prefix: str, n: int, rate: float, rate_sd: float,
         latency_s: float) -> Arm:
    k = rate * (1 - rate) / rate_sd**2 - 1  # Beta with this mean and sd
    return Arm(version, [f"{prefix}{i:02d}" for i in range(n)], rng.beta(rate * k, (1 - rate) * k, n),
               latency_s * rng.lognormal(0, 0.4, n))


class Fleet:
    """Devices reporting one interval per window, as agents do (one report per device and window)."""

    def __init__(self, path: Path) -> None:
        self.telemetry = TelemetryStore(path, profiles=lambda m, v: PROFILE, clock=lambda: T0 + 86_400)
        self.template = TelemetrySketch(PROFILE, "t", "mlp", "1.0.0", clock=lambda: T0,
                                        resource_probe=lambda: (0, 0.0, 0.0)).snapshot_and_reset()
        self.seq: dict[str, int] = {}
        self.window = 0

    def report(self, rng: np.random.Generator, device: str, version: str, rate: float, typical_s: float,
               requests: int = 300) -> bytes:
        n = int(rng.poisson(requests))
        lat = rng.lognormal(np.log(typical_s), 0.3, n)
        counts = np.bincount([latency_bucket(x) for x in lat], minlength=LATENCY_BUCKETS).astype(np.int64)
        seq = self.seq[device] = self.seq.get(device, -1) + 1
        end = T0 + 60 * self.window + 59.0
        rep: TelemetryReport = replace(
            self.template, device_id=device, seq=seq, version=version, interval_start=end - 59,
            interval_end=end, requests=n, errors=int(rng.binomial(n, rate)), latency_counts=counts,
            latency_sum_s=float(lat.sum()), latency_max_s=float(lat.max(initial=0.0)))
        return encode_report(rep)

    def run_window(self, rng: np.random.Generator, *arms: Arm) -> None:
        for arm in arms:
            for dev, rate, t in zip(arm.devices, arm.rates, arm.typical_s, strict=True):
                payload = self.report(rng, dev, arm.version, float(rate), float(t))
                assert self.telemetry.ingest(payload) == "accepted"
                assert self.telemetry.ingest(payload) == "duplicate"  # QoS 1 redelivery adds nothing
        self.window += 1

    def per_request_p(self, a: Arm, b: Arm) -> float:
        """The smallest p-value of the tests the experiments used before, over the same data:
        two-proportion z on the requests, Mann-Whitney U on the requests' latencies."""
        reps: list[TelemetryReport] = []
        for arm in (a, b):
            rep = self.telemetry.query_windows("mlp", arm.version, since=T0)
            assert rep is not None
            reps.append(rep)
        z_p = two_proportion_z(reps[0].errors, reps[0].requests, reps[1].errors, reps[1].requests)[1]
        xs = [np.repeat([v for v, _ in pairs], [c for _, c in pairs])
              for pairs in (latency_samples(r.latency_counts) for r in reps)]
        mw_p = float(stats.mannwhitneyu(xs[1], xs[0]).pvalue)
        return min(z_p, mw_p)


def _telemetry(store: Store, tmp_path: Path) -> Path | str:
    """The telemetry windows beside the store: telemetry.db for SQLite, the same PostgreSQL."""
    return store.location if store.dialect == "postgresql" else tmp_path / "telemetry.db"


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = Store(backend.location("fleet.db"), clock=FakeClock(now=T0))
    s.models.create_model("mlp", "", "t")
    for v in ("1.0.0", "2.0.0"):
        s.models.register_version("mlp", v, DIGEST, "onnx", {}, "t", bundle_target=f"models/mlp/mlp-{v}.efb")
    yield s
    s.close()


def _experiment(store: Store, **kw: object) -> str:
    ex = ExperimentRepo(store).create("v2", "mlp:1.0.0", "mlp:2.0.0", "", 0.5, dict(METRICS), 100, 0.05,
                                      "op", **kw)  # type: ignore[arg-type]
    return str(ex["id"])


def test_an_aa_experiment_with_device_spread_declares_no_winner_however_often_it_is_read(
        store: Store, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    a = _arm(rng, "1.0.0", "a", 40, 0.05, 0.03, 0.004)  # two arms of the same population
    b = _arm(rng, "2.0.0", "b", 40, 0.05, 0.03, 0.004)
    fleet, repo, eid = Fleet(_telemetry(store, tmp_path)), ExperimentRepo(store), _experiment(store)
    old_p, stored = 1.0, {m: 1.0 for m in METRICS}
    for _ in range(6):
        fleet.run_window(rng, a, b)
        rec = repo.recommendation(eid, fleet.telemetry)
        assert rec.verdict == "inconclusive", rec.summary
        by = {m.metric: m for m in rec.metrics}
        assert by["error_rate"].devices_a == by["error_rate"].devices_b == 40
        assert all(m.unit == "device" and m.level == 0.025 for m in rec.metrics)  # Bonferroni over 2
        state = repo.sequential_state(eid)
        for metric, st in state.items():  # the always-valid p-value only goes down, and is kept
            assert st.p_value <= stored[metric] and st.p_value == by[metric].p_value
            stored[metric] = st.p_value
        old_p = min(old_p, fleet.per_request_p(a, b))
    assert set(stored) == set(METRICS)
    assert old_p < 1e-3  # the per-request tests "found" a difference between identical arms
    assert "device-level always-valid mSPRT" in rec.summary and "Bonferroni" in rec.summary
    fleet.telemetry.close()


def test_a_real_lift_over_35_devices_per_arm_picks_b_and_the_verdict_never_flips_back(
        store: Store, tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    a = _arm(rng, "1.0.0", "a", 35, 0.08, 0.02, 0.004)
    b = _arm(rng, "2.0.0", "b", 35, 0.05, 0.02, 0.003)  # 3 points fewer errors, 25 % faster
    fleet, repo, eid = Fleet(_telemetry(store, tmp_path)), ExperimentRepo(store), _experiment(store)
    with store.tx() as db:  # as the driver records them; arm B's devices ran A's version before
        db.insert("experiment_devices",
            [{"experiment_id": eid, "device_id": d, "arm": "a", "assigned_at": T0} for d in a.devices]
            + [{"experiment_id": eid, "device_id": d, "arm": "b", "assigned_at": T0} for d in b.devices])
    fleet.run_window(rng, a, replace(b, version="1.0.0"))  # not yet switched: no evidence for A
    verdicts = []
    for _ in range(4):
        fleet.run_window(rng, a, b)
        verdicts.append(repo.recommendation(eid, fleet.telemetry))
    rec = verdicts[-1]
    assert rec.verdict == "b", rec.summary
    assert rec.summary.startswith("keep B: error_rate -0.0")
    by = {m.metric: m for m in rec.metrics}
    err, lat = by["error_rate"], by["latency_ms"]
    assert err.devices_a == err.devices_b == 35 and lat.devices_a == 35  # only arm A's own devices
    assert err.winner == "b" and err.p_value is not None and err.level == 0.025 and err.p_value < err.level
    assert lat.winner != "a"  # 25 % faster, but devices spread 40 %: the design asks for more devices
    assert err.ci_low is not None and err.ci_high is not None and err.effect is not None
    assert err.ci_low < err.effect < err.ci_high < 0 and err.tau == 0.01
    first_tau = {m.metric: m.tau for m in verdicts[0].metrics}["latency_ms"]  # fixed at the first read
    assert lat.tau == first_tau and lat.value_a is not None
    assert lat.tau == pytest.approx(0.1 * lat.value_a, rel=0.05)  # 10 % of A's mean at that read
    first = next(i for i, r in enumerate(verdicts) if r.verdict == "b")
    assert all(r.verdict == "b" for r in verdicts[first:])
    # B's advantage disappears: the reached verdict stands (the test stopped at its first crossing)
    b_now = replace(b, rates=a.rates.copy(), typical_s=a.typical_s.copy())
    for _ in range(3):
        fleet.run_window(rng, a, b_now)
        later = repo.recommendation(eid, fleet.telemetry)
        assert later.verdict == "b", later.summary
        p_now = {m.metric: m.p_value for m in later.metrics}["error_rate"]
        assert p_now is not None and p_now <= err.p_value
    fleet.telemetry.close()


def test_fewer_devices_than_min_devices_is_inconclusive_naming_the_devices_needed(
        store: Store, tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    a = _arm(rng, "1.0.0", "a", 6, 0.10, 0.03, 0.004)
    b = _arm(rng, "2.0.0", "b", 6, 0.03, 0.01, 0.002)  # a large lift, many requests, 6 devices
    fleet, repo, eid = Fleet(_telemetry(store, tmp_path)), ExperimentRepo(store), _experiment(store)
    for _ in range(5):
        fleet.run_window(rng, a, b)
    rec = repo.recommendation(eid, fleet.telemetry)
    assert rec.verdict == "inconclusive", rec.summary
    match = re.match(r"inconclusive: need (\d+) more devices per arm", rec.summary)
    assert match, rec.summary
    by = {m.metric: m for m in rec.metrics}
    needed = max(m.devices_needed for m in rec.metrics)
    assert int(match.group(1)) == needed - 6 >= 4 and by["error_rate"].devices_needed >= 10
    assert all(m.winner is None and m.p_value == 1.0 and m.ci_low is None for m in rec.metrics)
    assert by["error_rate"].n_a > 6 * 5 * 250  # thousands of requests are not devices
    assert repo.sequential_state(eid) == {}  # nothing counted: nothing stored
    assert fleet.per_request_p(a, b) < 1e-6  # the per-request tests declared B from 6 devices
    fleet.telemetry.close()


def test_the_api_takes_min_devices_and_taus_and_answers_with_device_level_verdicts(
        store: Store, tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    a = _arm(rng, "1.0.0", "a", 12, 0.08, 0.01, 0.004)
    b = _arm(rng, "2.0.0", "b", 12, 0.03, 0.01, 0.004)
    key = create_api_key(store, "op", "operator", "t")[1]
    h = {"Authorization": f"Bearer {key}"}
    body = {"name": "v2", "version_a": "mlp:1.0.0", "version_b": "mlp:2.0.0", "min_samples": 50}
    pg_url = str(store.location) if store.dialect == "postgresql" else None
    with TestClient(create_app(FleetSettings(data_dir=tmp_path, database_url=pg_url), store)) as c:
        for bad in ({"min_devices": 1}, {"taus": {"accuracy": 0.1}}, {"taus": {"error_rate": 0}}):
            assert c.post("/v1/experiments", headers=h, json={**body, **bad}).status_code == 422, bad
        ex = c.post("/v1/experiments", headers=h, json={**body, "min_devices": 12,
                                                        "taus": {"error_rate": 0.02}})
        assert ex.status_code == 201, ex.text
        assert (ex.json()["min_devices"], ex.json()["taus"]) == (12, {"error_rate": 0.02})
        eid = ex.json()["id"]
        fleet = Fleet(_telemetry(store, tmp_path))  # where the API reads
        for _ in range(3):
            fleet.run_window(rng, a, b)
        fleet.telemetry.close()
        rec = c.get(f"/v1/experiments/{eid}/recommendation", headers=h).json()
    assert rec["verdict"] == "b", rec["summary"]  # fewer errors, and no slower
    err = next(m for m in rec["metrics"] if m["metric"] == "error_rate")
    assert (err["unit"], err["tau"], err["level"], err["devices_a"], err["devices_b"]) == \
        ("device", 0.02, 0.025, 12, 12)
    assert err["winner"] == "b" and err["ci_low"] < err["effect"] < err["ci_high"] < 0
    assert err["effect"] == pytest.approx(err["value_b"] - err["value_a"]) and err["devices_needed"] >= 12
    assert math.isfinite(err["p_value"]) and err["p_value"] < 0.025
