"""A/B experiments: stable arms, the statistics, and the recommendation (unit); records, the
driver and the API over a real store (integration)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy import stats

from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.errors import Conflict, FleetInputError
from fleet.rollouts.experiment_verdicts import compare_metric
from fleet.rollouts.experiments import (
    ArmData,
    ExperimentDriver,
    ExperimentRepo,
    arm_of,
    latency_samples,
    recommend,
    samples_for_proportions,
    two_proportion_z,
)
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.device_totals import DeviceVersionTotals
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from tests.support.fakes import DIGEST, FakeClock
from tests.support.postgres import Backend


@pytest.mark.unit
def test_arms_are_stable_split_as_asked_and_independent_between_experiments() -> None:
    devices = [f"dev-{i}" for i in range(4000)]
    arms = [arm_of("ex-1", d, 0.25) for d in devices]
    assert arms == [arm_of("ex-1", d, 0.25) for d in devices]  # same answer every time
    share = arms.count("b") / len(arms)
    assert 0.22 < share < 0.28
    other = [arm_of("ex-2", d, 0.25) for d in devices]
    both = sum(a == o == "b" for a, o in zip(arms, other, strict=True)) / len(devices)
    assert 0.04 < both < 0.085  # about 0.25 * 0.25: the experiments do not share their B arm


@pytest.mark.unit
def test_two_proportion_z_matches_the_textbook_and_the_sample_size_formula() -> None:
    z, p = two_proportion_z(100, 1000, 130, 1000)
    pooled = 230 / 2000
    expected = (0.13 - 0.10) / np.sqrt(pooled * (1 - pooled) * (2 / 1000))
    assert z == pytest.approx(expected) and p == pytest.approx(2 * stats.norm.sf(expected))
    assert two_proportion_z(0, 0, 1, 10) == (0.0, 1.0)
    # 10 % vs 13 % needs about 1,770 per arm at alpha 0.05 and 80 % power
    assert 1700 < samples_for_proportions(0.10, 0.13, 0.05) < 1850


def _arms(seed: int, n: int, err_a: float, err_b: float, lat_a: float, lat_b: float,
          devices: int = 40) -> tuple[ArmData, ArmData]:
    """`n` requests per arm spread over `devices` devices, as telemetry gives them: each device
    with its own error rate (Beta around the arm's, sd 0.005) and its own typical latency
    (lognormal around the arm's, sigma 0.15), requests around it (sigma 0.3)."""
    rng = np.random.default_rng(seed)
    out = []
    for arm, (err, lat) in enumerate(((err_a, lat_a), (err_b, lat_b))):
        k = err * (1 - err) / 0.005**2 - 1
        rates, typical = rng.beta(err * k, (1 - err) * k, devices), lat * rng.lognormal(0, 0.15, devices)
        devs = []
        for i, (m, rate, t) in enumerate(zip(rng.multinomial(n, [1 / devices] * devices), rates, typical,
                                             strict=True)):
            lats = rng.lognormal(np.log(t), 0.3, int(m))
            devs.append(DeviceVersionTotals(f"{arm}-{i}", "mlp", str(arm), int(m), int(rng.binomial(m, rate)),
                                            int(m), float(lats.sum()), 1, 0.0, 0.0))
        out.append(ArmData(requests=n, errors=sum(d.errors for d in devs), devices=devs))
    return out[0], out[1]


@pytest.mark.unit
def test_a_known_winner_is_recommended_with_p_values_and_effect_sizes() -> None:
    a, b = _arms(1, 4000, err_a=0.05, err_b=0.02, lat_a=3.0, lat_b=2.4)
    rec = recommend(a, b, {"error_rate": "min", "latency_ms": "min"}, alpha=0.05, min_samples=500)
    assert rec.verdict == "b", rec.summary
    by = {m.metric: m for m in rec.metrics}
    assert by["error_rate"].p_value is not None and by["error_rate"].p_value < 1e-6
    assert by["error_rate"].effect_size == pytest.approx(b.errors / 4000 - a.errors / 4000)
    assert by["latency_ms"].effect_size is not None and by["latency_ms"].effect_size < -0.3  # B mostly faster
    assert rec.summary.startswith("keep B")
    # the goal matters: for a "max" metric the higher arm wins
    hi = ArmData(samples={"accuracy": [(0.9 + 0.01 * np.sin(i), 1) for i in range(600)]})
    lo = ArmData(samples={"accuracy": [(0.8 + 0.01 * np.sin(i), 1) for i in range(600)]})
    assert recommend(hi, lo, {"accuracy": "max"}).verdict == "a"


@pytest.mark.unit
def test_no_difference_or_too_few_samples_is_inconclusive_with_a_sample_estimate() -> None:
    a, b = _arms(2, 300, err_a=0.05, err_b=0.05, lat_a=3.0, lat_b=3.0)
    rec = recommend(a, b, {"error_rate": "min", "latency_ms": "min"}, min_samples=100)
    assert rec.verdict == "inconclusive"
    assert rec.summary.startswith("inconclusive: need") and "more samples per arm" in rec.summary
    # a real but small difference with a tiny sample: inconclusive, not a winner
    a, b = _arms(3, 60, err_a=0.05, err_b=0.03, lat_a=3.0, lat_b=2.9)
    small = recommend(a, b, {"error_rate": "min"}, min_samples=100)
    assert small.verdict == "inconclusive" and small.metrics[0].more_samples_needed > 40
    empty = recommend(ArmData(), ArmData(), {"error_rate": "min", "latency_ms": "min"}, min_samples=50)
    assert empty.verdict == "inconclusive" and "need" in empty.summary


@pytest.mark.unit
def test_the_sequential_state_carries_a_reached_verdict_and_only_tightens() -> None:
    a, b = _arms(5, 8000, err_a=0.06, err_b=0.03, lat_a=3.0, lat_b=3.0)
    first = compare_metric("error_rate", "min", a, b, alpha=0.05, metrics=2, min_samples=100)
    state = first.state()
    assert first.winner == "b" and state is not None and state.tau == 0.01 and first.level == 0.025
    # a later read that does not count (too few samples asked for) keeps what was established
    held = compare_metric("error_rate", "min", a, b, 0.05, 2, min_samples=10**6, previous=state)
    assert held.winner == "b" and held.p_value == state.p_value and held.state() is None
    # later reads can only lower the p-value and narrow the confidence sequence (its running
    # intersection); data that contradict the established interval leave it, and the verdict, be
    more_a, more_b = _arms(5, 32000, err_a=0.06, err_b=0.03, lat_a=3.0, lat_b=3.0)
    same_a, same_b = _arms(6, 8000, err_a=0.05, err_b=0.05, lat_a=3.0, lat_b=3.0)
    for arms in ((more_a, more_b), (same_a, same_b)):
        later = compare_metric("error_rate", "min", *arms, 0.05, 2, 100, previous=state)
        after = later.state()
        assert later.winner == "b" and after is not None and after.p_value <= state.p_value
        assert state.ci_low <= after.ci_low <= after.ci_high <= state.ci_high < 0
    # no evidence at all: no p-value, and the summary names the devices a verdict needs
    empty = recommend(ArmData(), ArmData(), {"error_rate": "min"}, min_devices=12)
    assert empty.metrics[0].p_value is None and empty.summary.startswith("inconclusive: need 12 more devices")


@pytest.mark.unit
def test_metrics_that_disagree_are_reported_as_conflicting() -> None:
    a, b = _arms(4, 4000, err_a=0.02, err_b=0.06, lat_a=3.0, lat_b=2.0)  # B faster but more errors
    rec = recommend(a, b, {"error_rate": "min", "latency_ms": "min"}, min_samples=500)
    assert rec.verdict == "conflicting" and "error_rate favours A" in rec.summary


@pytest.mark.unit
def test_latency_histograms_become_weighted_samples() -> None:
    counts = np.zeros(12, np.int64)
    counts[3], counts[7] = 5, 2
    pairs = latency_samples(counts)
    assert [w for _, w in pairs] == [5, 2] and pairs[0][0] < pairs[1][0]
    arm = ArmData(samples={"latency_ms": pairs})
    assert arm.count("latency_ms") == 7 and arm.sample("latency_ms").size == 7


@pytest.fixture
def setup(tmp_path: Path, backend: Backend) -> Iterator[tuple[Store, Repository, DirectorSigner]]:
    clock = FakeClock()
    store = Store(backend.location("fleet.db"), clock=clock)
    repo = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"))
    repo.init(root_threshold=1, root_keys=1)
    store.models.create_model("mlp", "", "t")
    for v in ("1.0.0", "2.0.0"):
        f = tmp_path / f"{v}.efb"
        f.write_bytes(v.encode())
        path = f"models/mlp/mlp-{v}.efb"
        repo.add_target(f, path, {"name": "mlp", "version": v})
        store.models.register_version("mlp", v, DIGEST, "onnx", {}, "t", bundle_target=path)
    store.models.register_version("mlp", "9.0.0", DIGEST, "onnx", {}, "t")
    for i in range(40):
        store.devices.create(f"d{i}", {"env": "prod"}, {}, f"d{i}", "$7$x", "t")
    store.devices.create("lab", {"env": "lab"}, {}, "lab", "$7$x", "t")
    yield store, repo, DirectorSigner(KeyStore(tmp_path / "keys"), tmp_path / "director")
    store.close()


class Recorder:
    def __init__(self) -> None:
        self.sent: dict[str, str] = {}

    def publish_desired(self, device_id: str | None = None, cohort: str | None = None, *,
                        document: bytes) -> str:
        assert device_id is not None
        self.sent[device_id] = json.loads(document)["signed"]["target"]["version"]
        return device_id


@pytest.mark.integration
def test_the_driver_sends_each_device_its_arm_once(setup: tuple[Store, Repository, DirectorSigner]) -> None:
    store, repo, signer = setup
    exps = ExperimentRepo(store)
    ex = exps.create("faster", "mlp:1.0.0", "mlp:2.0.0", "env=prod", 0.5, {"error_rate": "min"}, 100, 0.05,
                     "op")
    pub = Recorder()
    driver = ExperimentDriver(store, repo, signer, pub)
    assert driver.tick() == 40 and driver.tick() == 0  # idempotent: nobody gets a second document
    assert "lab" not in pub.sent
    for dev, version in pub.sent.items():
        assert version == ("2.0.0" if arm_of(ex["id"], dev, 0.5) == "b" else "1.0.0")
    assert set(exps.devices(ex["id"]).values()) == {"a", "b"}
    store.devices.create("late", {"env": "prod"}, {}, "late", "$7$x", "t")
    assert driver.tick() == 1
    exps.stop(ex["id"], "op")
    store.devices.create("later", {"env": "prod"}, {}, "later", "$7$x", "t")
    assert driver.tick() == 0
    with pytest.raises(Conflict):
        exps.stop(ex["id"], "op")
    with pytest.raises(Conflict, match="no bundle"):
        exps.create("x", "mlp:1.0.0", "mlp:9.0.0", "", 0.5, {"error_rate": "min"}, 10, 0.05, "op")
    with pytest.raises(FleetInputError, match="split_b"):
        exps.create("x", "mlp:1.0.0", "mlp:2.0.0", "", 1.5, {"error_rate": "min"}, 10, 0.05, "op")
    with pytest.raises(Conflict, match="two different versions"):
        exps.create("x", "mlp:1.0.0", "mlp:1.0.0", "", 0.5, {"error_rate": "min"}, 10, 0.05, "op")


@pytest.mark.integration
def test_api_recommendation_from_observations(setup: tuple[Store, Repository, DirectorSigner],
                                               tmp_path: Path) -> None:
    store, _, _ = setup
    key = create_api_key(store, "op", "operator", "t")[1]
    h = {"Authorization": f"Bearer {key}"}
    settings = FleetSettings(data_dir=tmp_path)
    with TestClient(create_app(settings, store)) as c:
        ex = c.post("/v1/experiments", headers=h, json={
            "name": "acc", "version_a": "mlp:1.0.0", "version_b": "mlp:2.0.0", "selector": "env=prod",
            "metrics": {"accuracy": "max"}, "min_samples": 200})
        assert ex.status_code == 201, ex.text
        eid = ex.json()["id"]
        early = c.get(f"/v1/experiments/{eid}/recommendation", headers=h).json()
        assert early["verdict"] == "inconclusive" and "need" in early["summary"]
        rng = np.random.default_rng(7)
        for arm, mean in (("a", 0.80), ("b", 0.84)):
            values = np.clip(rng.normal(mean, 0.05, 800), 0, 1).tolist()
            res = c.post(f"/v1/experiments/{eid}/observations", headers=h,
                         json={"arm": arm, "metric": "accuracy", "values": values})
            assert res.status_code == 202 and res.json() == {"accepted": 800}
        rec = c.get(f"/v1/experiments/{eid}/recommendation", headers=h).json()
        assert rec["verdict"] == "b" and rec["metrics"][0]["p_value"] < 1e-6
        # pushed observations carry no device: judged, and labelled, per observation
        assert rec["metrics"][0]["unit"] == "observation" and rec["metrics"][0]["devices_a"] == 0
        assert "per observation for accuracy" in rec["summary"]
        bad = c.post(f"/v1/experiments/{eid}/observations", headers=h,
                     json={"arm": "c", "metric": "accuracy", "values": [1.0]})
        assert bad.status_code == 422
        assert c.post(f"/v1/experiments/{eid}/stop", headers=h).json()["state"] == "stopped"
    actions = {e.action for e in store.audit.list(None, 50, resource=f"experiments/{eid}").items}
    assert actions == {"experiment.create", "experiment.stop"}


@pytest.mark.integration
def test_recommendation_from_real_telemetry_windows(setup: tuple[Store, Repository, DirectorSigner],
                                                    tmp_path: Path) -> None:
    """Arm B (2.0.0) fails less and answers faster in device-built telemetry, but on 3 devices
    per arm: no verdict before `min_devices` (10) per arm, and the summary names the devices
    still needed (the per-request tests declared B from these 3 devices)."""
    from agent.contract.telemetry_codec import encode_report
    from agent.telemetry import TelemetrySketch
    from fleet.telemetry.ingest import TelemetryStore
    from tests.support.telemetry import T0, small_profile

    store, _, _ = setup
    store.clock.now = T0  # type: ignore[attr-defined]
    ex = ExperimentRepo(store).create("v2", "mlp:1.0.0", "mlp:2.0.0", "env=prod", 0.5,
                                      {"error_rate": "min", "latency_ms": "min"}, 300, 0.01, "op")
    telemetry = TelemetryStore(tmp_path / "telemetry.db", clock=lambda: T0 + 600)
    profile = small_profile()
    rng = np.random.default_rng(3)
    for version, err, lat in (("1.0.0", 0.06, 0.004), ("2.0.0", 0.02, 0.002)):
        for dev in range(3):
            ticks = iter([T0 + 61.0, T0 + 119.0])
            sketch = TelemetrySketch(profile, f"{version}-{dev}", "mlp", version, cohort="prod",
                                     clock=ticks.__next__, resource_probe=lambda: (0, 0.0, 0.0))
            for _ in range(400):
                x = rng.normal(size=(1, 4))
                sketch.update(x, x.sum(axis=1), float(rng.lognormal(np.log(lat), 0.2)),
                              error=bool(rng.random() < err))
            assert telemetry.ingest(encode_report(sketch.snapshot_and_reset())) == "accepted"
    try:
        rec = ExperimentRepo(store).recommendation(ex["id"], telemetry)
    finally:
        telemetry.close()
    by = {m.metric: m for m in rec.metrics}
    assert rec.verdict == "inconclusive", rec.summary
    assert rec.summary.startswith("inconclusive: need 7 more devices per arm"), rec.summary
    assert by["error_rate"].devices_a == by["error_rate"].devices_b == 3
    assert by["error_rate"].devices_needed >= 10 and by["error_rate"].winner is None
    assert by["error_rate"].n_a == by["error_rate"].n_b == 1200
    assert by["latency_ms"].p95_a is not None and by["latency_ms"].p95_b is not None
    assert by["latency_ms"].p95_b < by["latency_ms"].p95_a


@pytest.mark.integration
def test_the_driver_leaves_devices_held_by_a_running_rollout(
        setup: tuple[Store, Repository, DirectorSigner]) -> None:
    from fleet.rollouts.controller import RolloutController

    store, repo, signer = setup
    rollout_pub, ab_pub = Recorder(), Recorder()
    rid = store.rollouts.create("mlp:2.0.0", "env=prod", {"kind": "all_at_once"}, {}, "op").id
    RolloutController(store, repo, signer, rollout_pub, store.clock).tick()
    ex = ExperimentRepo(store).create("ab", "mlp:1.0.0", "mlp:2.0.0", "", 0.5, {"error_rate": "min"}, 10,
                                      0.05, "op")
    driver = ExperimentDriver(store, repo, signer, ab_pub)
    assert driver.tick() == 1 and set(ab_pub.sent) == {"lab"}  # the 40 prod devices are busy
    store.rollouts.set_state(rid, "completed", 0, "test")
    assert driver.tick() == 40
    assert len(ExperimentRepo(store).devices(ex["id"])) == 41
