"""Golden vectors, probation, the watchdog, hot swap and shadow mode with real onnxruntime."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.contract.manifest import HealthPolicy, Manifest
from agent.errors import InferenceTimeoutError, InputValidationError, NoModelLoadedError
from agent.lifecycle.health import Probation, check_golden, run_with_deadline
from agent.runtimes import LoadedModel, load_model
from agent.serving.model_holder import ModelHolder
from simulators.models import make_mlp_onnx
from tests.support.lifecycle_world import Hammer, X, manifest_for


def _load(tmp_path: Path, seed: int, golden_seed: int | None = None) -> tuple[LoadedModel, Manifest]:
    data = make_mlp_onnx(seed)
    manifest = manifest_for("1.0.0", data, seed if golden_seed is None else golden_seed)
    path = tmp_path / f"m{seed}" / "model.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return load_model(path, manifest), manifest


@pytest.mark.integration
def test_golden_vectors_pass_and_fail_with_max_deviation(tmp_path: Path) -> None:
    good, manifest = _load(tmp_path, 0)
    res = check_golden(good, manifest)
    assert res.ok and res.vectors == 8 and res.max_abs_dev < 1e-4 and res.label_agreement == 1.0
    bad, bad_manifest = _load(tmp_path, 1, golden_seed=0)
    res = check_golden(bad, bad_manifest)
    assert not res.ok and res.max_abs_dev > 0.01 and "outside rtol" in res.reason
    # label agreement mode: the same numbers pass or fail on argmax agreement only
    lenient = Manifest.model_validate({**bad_manifest.model_dump(), "golden": {
        **bad_manifest.golden.model_dump(), "label_agreement_min": 0.0}})
    assert check_golden(bad, lenient).ok
    strict = Manifest.model_validate({**bad_manifest.model_dump(), "golden": {
        **bad_manifest.golden.model_dump(), "label_agreement_min": 1.0}})
    res = check_golden(bad, strict)
    assert res.label_agreement is not None and res.ok == (res.label_agreement >= 1.0)
    assert not res.ok  # another model's labels do not all agree


@pytest.mark.integration
def test_golden_vectors_of_the_wrong_shape_fail(tmp_path: Path) -> None:
    model, manifest = _load(tmp_path, 0)
    wrong = Manifest.model_validate({**manifest.model_dump(), "golden": {
        "inputs": {"x": X.tolist()}, "expected": {"logits": [[0.0, 1.0]]}}})
    res = check_golden(model, wrong)
    assert not res.ok and "shape" in res.reason
    broken = Manifest.model_validate({**manifest.model_dump(), "golden": {
        "inputs": {"x": [[1.0, 2.0]]}, "expected": {"logits": [[0.0]]}}})
    with pytest.raises(InputValidationError):
        check_golden(model, broken)


@pytest.mark.unit
def test_probation_latency_error_rate_and_memory() -> None:
    now = [0.0]
    policy = HealthPolicy(latency_budget_ms=5.0, max_error_rate=0.1, probation_requests=20,
                          probation_seconds=1.0, max_memory_mb=100.0)
    p = Probation(policy, clock=lambda: now[0], rss_mb=lambda: 50.0)
    for _ in range(20):
        p.observe(0.001, True)
    assert p.verdict() is None  # enough requests, not enough time
    now[0] = 1.0
    v = p.verdict()
    assert v is not None and v.ok and v.measurements["p95_ms"] == pytest.approx(1.0)
    slow = Probation(policy, clock=lambda: now[0], rss_mb=lambda: 50.0)
    for _ in range(20):
        slow.observe(0.010, True)
    now[0] = 3.0
    v = slow.verdict()
    assert v is not None and not v.ok and "p95 latency" in v.reason
    errors = Probation(policy, clock=lambda: now[0], rss_mb=lambda: 50.0)
    for _ in range(3):
        errors.observe(0.001, False)
    v = errors.verdict()  # 3 errors > 10 % of a 20-request window: fails early
    assert v is not None and not v.ok and "error rate" in v.reason
    fat = Probation(policy, clock=lambda: now[0], rss_mb=lambda: 150.0)
    v = fat.verdict()
    assert v is not None and not v.ok and "memory" in v.reason and v.measurements["peak_rss_mb"] == 150.0


@pytest.mark.unit
def test_probation_closes_on_a_time_cap_without_traffic() -> None:
    now = [0.0]
    p = Probation(HealthPolicy(probation_requests=100, probation_seconds=1.0), clock=lambda: now[0],
                  rss_mb=lambda: 1.0, max_wait_s=5.0)
    now[0] = 4.0
    assert p.verdict() is None
    now[0] = 5.0
    v = p.verdict()  # the default policy needs answered requests: no traffic is no evidence
    assert v is not None and not v.ok and "no evidence" in v.reason
    golden_only = Probation(HealthPolicy(probation_requests=100, probation_seconds=1.0, traffic="none"),
                            clock=lambda: now[0], rss_mb=lambda: 1.0, max_wait_s=5.0)
    now[0] = 10.0
    v = golden_only.verdict()
    assert v is not None and v.ok and "window closed" in v.reason


@pytest.mark.unit
def test_watchdog_returns_raises_and_times_out() -> None:
    assert run_with_deadline(lambda: 41 + 1, 1.0, "add") == 42
    with pytest.raises(ZeroDivisionError):
        run_with_deadline(lambda: 1 / 0, 1.0, "div")
    gate = threading.Event()
    with pytest.raises(InferenceTimeoutError, match=r"hang did not finish within 0\.05s"):
        run_with_deadline(lambda: gate.wait(5), 0.05, "hang")
    gate.set()


@pytest.mark.integration
def test_swap_and_revert_under_load_fail_no_request(tmp_path: Path) -> None:
    holder = ModelHolder()
    with pytest.raises(NoModelLoadedError, match="no model"):
        holder.predict({"x": X[:1]})
    a, _ = _load(tmp_path, 0)
    holder.swap(a, "a")
    with Hammer(holder, threads=3) as hammer:
        for i in range(20):
            b, _ = _load(tmp_path, 1 + i % 2)
            holder.swap(b, f"b{i}")
            assert holder.standby_id == "a" or holder.standby_id is not None
            assert holder.revert()
        time.sleep(0.05)
    assert hammer.failed == [] and hammer.ok > 0
    assert holder.bundle_id == "a" and holder.standby_id is None
    assert not holder.revert()  # nothing to revert to
    holder.close()


@pytest.mark.integration
def test_observers_see_every_request_and_errors(tmp_path: Path) -> None:
    holder = ModelHolder()
    a, _ = _load(tmp_path, 0)
    holder.swap(a, "a", keep_previous=False)
    seen: list[tuple[str, bool]] = []
    rejected: list[str] = []
    def observer(b: str, lat: float, ok: bool) -> None:
        seen.append((b, ok))

    holder.add_observer(observer)
    holder.add_reject_observer(rejected.append)
    assert holder.predict_tagged({"x": X})[0] == "a"
    with pytest.raises(InputValidationError):  # not a model error; reject observers see it
        holder.predict({"x": np.zeros((1, 3), np.float32)})
    assert rejected == ["a"]
    broken, _ = _load(tmp_path, 1)
    broken.close()  # a closed session fails inside the runtime: that counts
    holder.swap(broken, "b", keep_previous=False)
    with pytest.raises(Exception):
        holder.predict({"x": X})
    assert seen == [("a", True), ("b", False)]
    holder.remove_observer(observer)
    holder.remove_reject_observer(rejected.append)
    holder.remove_observer(observer)  # not there any more: nothing happens
    holder.swap(_load(tmp_path, 2)[0], "c", keep_previous=False)
    holder.predict({"x": X})
    with pytest.raises(InputValidationError):
        holder.predict({"x": np.zeros((1, 3), np.float32)})
    assert seen == [("a", True), ("b", False)] and rejected == ["a"]  # removed: told nothing
    holder.close()


class _Gated:
    """A model whose predict waits for `go` (and says it started): an in-flight request."""

    def __init__(self, model: LoadedModel) -> None:
        self.model, self.started, self.go, self.closed = model, threading.Event(), threading.Event(), False

    def predict(self, inputs):  # type: ignore[no-untyped-def]
        self.started.set()
        assert self.go.wait(30)
        return self.model.predict(inputs)

    def close(self) -> None:
        self.closed = True
        self.model.close()


@pytest.mark.integration
def test_a_retired_model_closes_as_soon_as_its_last_request_ends(tmp_path: Path) -> None:
    """The swap waits for the old model's in-flight request, and is woken when it ends (not at
    the drain timeout): requests only notify when someone is retiring a model."""
    holder = ModelHolder(drain_timeout_s=60)
    a, _ = _load(tmp_path, 0)
    b, _ = _load(tmp_path, 1)
    gated = _Gated(a)
    holder.swap(gated, "a", keep_previous=False)  # type: ignore[arg-type]
    seen: list[str] = []
    holder.add_observer(lambda bid, lat, ok: seen.append(bid))
    request = threading.Thread(target=holder.predict, args=({"x": X},))
    request.start()
    assert gated.started.wait(10)
    swap = threading.Thread(target=holder.swap, args=(b, "b"), kwargs={"keep_previous": False})
    swap.start()
    swap.join(0.3)
    assert swap.is_alive() and not gated.closed  # waiting for the request on "a"
    assert holder.predict_tagged({"x": X})[0] == "b"  # new requests go to "b" meanwhile
    gated.go.set()
    request.join(10)
    swap.join(10)  # woken by the request's end, long before the 60 s drain timeout
    assert not swap.is_alive() and gated.closed
    assert sorted(seen) == ["a", "b"]
    holder.close()


class _Slow:
    def __init__(self, model: LoadedModel, delay: float) -> None:
        self.model, self.delay = model, delay

    def predict(self, inputs):  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        return self.model.predict(inputs)

    def close(self) -> None:
        self.model.close()


@pytest.mark.integration
def test_shadow_compares_off_the_request_path_and_drops_when_full(tmp_path: Path) -> None:
    holder = ModelHolder(shadow_queue_size=4)
    a, _ = _load(tmp_path, 0)
    same, _ = _load(tmp_path, 0)
    holder.swap(a, "a", keep_previous=False)
    holder.set_shadow(same, "a-copy")
    for _ in range(3):
        holder.predict({"x": X})
    deadline = time.monotonic() + 5
    while holder.shadow_report().compared < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    rep = holder.shadow_report()
    assert rep.compared == 3 and rep.label_agreement == 1.0 and rep.mean_abs_diff == 0.0
    # a slow shadow never slows serving: copies beyond the queue are dropped and counted
    other, _ = _load(tmp_path, 1)
    holder.set_shadow(_Slow(other, 0.05), "slow")
    for _ in range(50):
        holder.predict({"x": X[:1]})
    rep = holder.shadow_report()
    assert rep.bundle_id == "slow" and rep.offered == 50 and rep.dropped >= 40  # inline would drop none
    holder.set_shadow(None)
    assert holder.shadow_report().bundle_id is None
    holder.close()
