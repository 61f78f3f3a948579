"""End-to-end lifecycle on real files: real TUF repository, real bundles, real onnxruntime."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.lifecycle import State
from agent.lifecycle.health import hung_threads
from agent.runtimes import load_model
from simulators.models import mlp_reference, mlp_weights
from tests.support.lifecycle_world import FAST, Hammer, Repo, X, make_device, make_repo, make_spinning_mlp


@pytest.fixture(scope="module", autouse=True)
def _join_abandoned_runs() -> Iterator[None]:
    """Wait for the runs the watchdog abandoned (the spinning model ends by itself in seconds):
    onnxruntime aborts the interpreter at exit if a session is still running in a thread."""
    yield
    for t in threading.enumerate():
        if t.name.startswith("watchdog-"):
            t.join(60)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    r = make_repo(tmp_path_factory.mktemp("repo"))
    r.publish("1.0.0", model_seed=0)
    r.publish("2.0.0", model_seed=1)
    r.publish("3.0.0", model_seed=2, golden_seed=0)  # golden vectors of another model: fails
    r.publish("4.0.0", model_seed=3, health={"latency_budget_ms": 1e-6, "probation_requests": 30,
                                            "probation_seconds": 0.0, "inference_timeout_s": 2.0})
    r.publish("5.0.0", model_seed=4, health={**FAST, "inference_timeout_s": 0.3, "probation_requests": 200})
    # ~2 s per run on a quiet core (0.7 us per trip): far beyond the 0.2 s load watchdog on any machine
    r.publish("8.0.0", model_seed=0, model=make_spinning_mlp(3_000_000),
              health={**FAST, "inference_timeout_s": 0.1})
    return r


def _serves(holder, seed: int) -> None:  # type: ignore[no-untyped-def]
    out = holder.predict({"x": X})["logits"]
    np.testing.assert_allclose(out, mlp_reference(X, mlp_weights(seed)), rtol=1e-4, atol=1e-5)


def _installed(repo: Repo, tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    dev = make_device(repo, tmp_path / "dev", **kw)
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0"))
    assert dev.lifecycle.start() is State.IDLE
    assert dev.lifecycle.record.active == "mlp-1.0.0"
    return dev


@pytest.mark.integration
def test_install_then_commit(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path)
    _serves(dev.holder, 0)
    assert dev.names()[:1] == ["update_started"] and "committed" in dev.names()
    dev.lifecycle.offer_desired(repo.desired("mlp-2.0.0"))
    assert dev.lifecycle.run_until_stable() is State.IDLE
    rec = dev.lifecycle.record
    assert (rec.active, rec.previous, rec.staged, rec.candidate) == ("mlp-2.0.0", "mlp-1.0.0", None, None)
    _serves(dev.holder, 1)
    assert dev.holder.standby_id is None  # the old model was closed at commit
    assert dev.lifecycle.ctx.slots.installed() == ["mlp-1.0.0", "mlp-2.0.0"]


@pytest.mark.integration
def test_golden_failure_rolls_back_and_quarantines(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path)
    bad = repo.desired("mlp-3.0.0")
    dev.lifecycle.offer_desired(bad)
    dev.lifecycle.run_until_stable()
    rec = dev.lifecycle.record
    assert rec.active == "mlp-1.0.0" and rec.quarantined == {"mlp-3.0.0": bad.sequence}
    ev = dev.event("rolled_back")
    assert ev["bundle"] == "mlp-3.0.0" and ev["swapped"] is False
    assert "golden" in ev["reason"] and ev["measurements"]["golden_max_abs_dev"] > 0.01
    _serves(dev.holder, 0)
    assert "mlp-3.0.0" not in dev.lifecycle.ctx.slots.installed()  # GC removed it
    # the same document again (duplicate delivery) does not retry it
    n = len(dev.events)
    dev.lifecycle.offer_desired(bad)
    dev.lifecycle.run_until_stable()
    assert len(dev.events) == n
    # a newer document naming it again does retry (and fails again)
    dev.lifecycle.offer_desired(repo.desired("mlp-3.0.0"))
    dev.lifecycle.run_until_stable()
    assert [n for n in dev.names() if n == "rolled_back"] == ["rolled_back", "rolled_back"]


@pytest.mark.integration
def test_probation_latency_failure_rolls_back_without_failed_requests(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path)
    dev.lifecycle.offer_desired(repo.desired("mlp-4.0.0"))
    with Hammer(dev.holder) as hammer:
        dev.lifecycle.run_until_stable()
    assert hammer.failed == [] and hammer.ok > 30
    rec = dev.lifecycle.record
    assert rec.active == "mlp-1.0.0" and rec.previous is None and "mlp-4.0.0" in rec.quarantined
    ev = dev.event("rolled_back")
    assert ev["swapped"] is True and "p95 latency" in ev["reason"]
    assert ev["measurements"]["p95_ms"] > ev["measurements"]["latency_budget_ms"]
    assert ev["measurements"]["rollback_ms"] >= 0
    _serves(dev.holder, 0)


@pytest.mark.integration
def test_real_runtime_hang_on_load_is_caught_by_the_watchdog(repo: Repo, tmp_path: Path) -> None:
    """The model spins inside onnxruntime for about a second on every run (load warms it)."""
    dev = _installed(repo, tmp_path, load_timeout_s=0.2)
    dev.lifecycle.offer_desired(repo.desired("mlp-8.0.0"))
    with Hammer(dev.holder) as hammer:
        dev.lifecycle.run_until_stable()
    assert hammer.failed == []
    ev = dev.event("rolled_back")
    assert "load hung" in ev["reason"] and ev["swapped"] is False
    assert dev.lifecycle.record.active == "mlp-1.0.0" and "mlp-8.0.0" in dev.lifecycle.record.quarantined
    assert hung_threads() >= 1
    _serves(dev.holder, 0)


@pytest.mark.integration
@pytest.mark.parametrize("hang_at_call", [1, 40])
def test_hang_in_golden_or_in_probation_rolls_back(repo: Repo, tmp_path: Path, hang_at_call: int) -> None:
    """Fault injection around the real runtime: the n-th run of mlp-5.0.0 wedges."""
    release = threading.Event()

    def hanging_loader(path, manifest, threads):  # type: ignore[no-untyped-def]
        model = load_model(path, manifest, threads)
        if manifest.version != "5.0.0":
            return model
        calls = [0]

        class Wedges:
            def predict(self, inputs):  # type: ignore[no-untyped-def]
                calls[0] += 1
                if calls[0] >= hang_at_call:
                    release.wait(10)
                return model.predict(inputs)

            def close(self) -> None:
                model.close()

        return Wedges()

    dev = _installed(repo, tmp_path, load=hanging_loader)
    dev.lifecycle.offer_desired(repo.desired("mlp-5.0.0"))
    with Hammer(dev.holder, threads=2):
        try:
            dev.lifecycle.run_until_stable()
        finally:
            release.set()  # un-wedge the request threads before they are joined
    ev = dev.event("rolled_back")
    if hang_at_call == 1:
        assert "golden vectors hung" in ev["reason"] and ev["swapped"] is False
    else:
        assert "a request hung" in ev["reason"] and ev["swapped"] is True
        assert ev["measurements"]["stuck_s"] >= 0.3  # over the 0.3 s timeout, rounded to 4 places
    assert dev.lifecycle.record.active == "mlp-1.0.0" and "mlp-5.0.0" in dev.lifecycle.record.quarantined
    _serves(dev.holder, 0)


@pytest.mark.integration
def test_operator_rollback_uses_the_previous_slot_without_download(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path)
    dev.lifecycle.offer_desired(repo.desired("mlp-2.0.0"))
    dev.lifecycle.run_until_stable()

    def no_download(path, expected=None):  # type: ignore[no-untyped-def]
        raise AssertionError("operator rollback must not download")

    dev.lifecycle.ctx.trust.download_target = no_download  # type: ignore[method-assign]
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0"))
    dev.lifecycle.run_until_stable()
    rec = dev.lifecycle.record
    assert (rec.active, rec.previous) == ("mlp-1.0.0", "mlp-2.0.0")
    started = [f for n, f in dev.events if n == "update_started"]
    assert started[-1]["bundle"] == "mlp-1.0.0" and started[-1]["download"] is False
    _serves(dev.holder, 0)


@pytest.mark.integration
def test_local_rollback_request_during_probation(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path)
    slow = repo.publish("6.0.0", model_seed=5, health={**FAST, "probation_seconds": 30.0})
    dev.lifecycle.offer_desired(repo.desired(slow))
    t = threading.Timer(0.3, dev.lifecycle.request_rollback)
    t.start()
    dev.lifecycle.run_until_stable()
    t.join()
    assert dev.event("rolled_back")["reason"] == "operator requested rollback"
    assert dev.lifecycle.record.active == "mlp-1.0.0"
    # a request while nothing is being installed is dropped, not kept for the next probation
    dev.lifecycle.request_rollback()
    dev.lifecycle.run_until_stable()
    dev.lifecycle.offer_desired(repo.desired("mlp-2.0.0"))
    dev.lifecycle.run_until_stable()
    assert dev.lifecycle.record.active == "mlp-2.0.0"


@pytest.mark.integration
@pytest.mark.parametrize("newer", ["mlp-1.0.0", "mlp-2.0.0"])  # the operator's rollback; another version
def test_a_newer_order_ends_probation_at_once(repo: Repo, tmp_path: Path, newer: str) -> None:
    dev = _installed(repo, tmp_path)
    slow = repo.publish("6.0.0", model_seed=5, health={**FAST, "probation_seconds": 3600.0})
    dev.lifecycle.offer_desired(repo.desired(slow))
    order = repo.desired(newer)
    t = threading.Timer(0.3, dev.lifecycle.offer_desired, args=(order,))
    t.start()
    dev.lifecycle.run_until_stable()  # without the supersede this waits out the hour's window
    t.join()
    ev = dev.event("rolled_back")
    assert ev["bundle"] == "mlp-6.0.0" and ev["reason"].startswith("superseded during probation")
    rec = dev.lifecycle.record
    assert (rec.active, rec.director_sequence) == (newer, order.sequence)
    assert not any(n == "committed" and f.get("bundle") == "mlp-6.0.0" for n, f in dev.events)
    # a newer order naming the bundle under probation (a re-issued document) does not end it
    before = sum(1 for n, _ in dev.events if n == "rolled_back")
    dev.lifecycle.offer_desired(repo.desired(slow))  # newer than the quarantine: installs again
    same, last = repo.desired(slow), repo.desired("mlp-1.0.0")
    timers = [threading.Timer(0.3, dev.lifecycle.offer_desired, args=(same,)),
              threading.Timer(1.0, dev.lifecycle.offer_desired, args=(last,))]
    for timer in timers:
        timer.start()
    dev.lifecycle.run_until_stable()
    for timer in timers:
        timer.join()
    rolled = [f for n, f in dev.events if n == "rolled_back"][before:]
    assert len(rolled) == 1 and f"sequence {last.sequence} " in rolled[0]["reason"]
    assert dev.lifecycle.record.active == "mlp-1.0.0"


@pytest.mark.integration
def test_tampered_target_is_refused_and_quarantined(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path)
    d = repo.desired("mlp-2.0.0")
    forged = type(d)(**{**d.__dict__, "sha256": "0" * 64})
    dev.lifecycle.offer_desired(forged)
    dev.lifecycle.run_until_stable()
    ev = dev.event("rolled_back")
    assert "refused" in ev["reason"] and ev["swapped"] is False
    assert dev.lifecycle.record.active == "mlp-1.0.0" and "mlp-2.0.0" in dev.lifecycle.record.quarantined


@pytest.mark.integration
def test_transport_failure_backs_off_and_retries(repo: Repo, tmp_path: Path) -> None:
    from agent.errors import TransportError

    dev = _installed(repo, tmp_path)
    real = dev.lifecycle.ctx.trust.download_target
    calls = []

    def flaky(path, expected=None):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 1:
            raise TransportError("broker went away")
        return real(path, expected)

    dev.lifecycle.ctx.trust.download_target = flaky  # type: ignore[method-assign]
    dev.lifecycle.offer_desired(repo.desired("mlp-2.0.0"))
    dev.lifecycle.run_until_stable()
    rec = dev.lifecycle.record
    assert rec.active == "mlp-1.0.0" and rec.retry_at > time.time() and rec.quarantined == {}
    assert dev.event("update_failed")["reason"].startswith("download failed")
    rec.retry_at = 0.0  # the backoff has passed
    dev.lifecycle.run_until_stable()
    assert dev.lifecycle.record.active == "mlp-2.0.0" and len(calls) == 2


@pytest.mark.integration
def test_a_disk_too_small_fails_before_any_byte_is_written_and_retries(repo: Repo, tmp_path: Path) -> None:
    import dataclasses
    import shutil

    dev = _installed(repo, tmp_path)
    ctx = dev.lifecycle.ctx
    roomy = ctx.config
    # a reserve of the whole disk: never free, whatever else runs on this machine
    ctx.config = dataclasses.replace(roomy, disk_reserve_bytes=shutil.disk_usage(tmp_path).total)
    dev.lifecycle.offer_desired(repo.desired("mlp-2.0.0"))
    assert dev.lifecycle.run_until_stable() is State.IDLE
    rec = dev.lifecycle.record
    reason = dev.event("update_failed")["reason"]
    assert "disk full: mlp-2.0.0 needs" in reason and "free on the state directory's disk" in reason
    assert rec.active == "mlp-1.0.0" and rec.retry_at > time.time() and rec.quarantined == {}
    assert dev.holder.bundle_id == "mlp-1.0.0"  # still serving the old bundle
    assert [p for p in dev.dir.rglob("*") if "2.0.0" in p.name] == []  # nothing fetched or staged
    ctx.config = roomy  # space freed: the retry installs it
    rec.retry_at = 0.0
    dev.lifecycle.run_until_stable()
    assert dev.lifecycle.record.active == "mlp-2.0.0"


@pytest.mark.integration
def test_gc_keeps_disk_bounded(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path)
    for bid in ("mlp-2.0.0", "mlp-3.0.0", "mlp-1.0.0", "mlp-2.0.0"):
        dev.lifecycle.offer_desired(repo.desired(bid))
        dev.lifecycle.run_until_stable()
        assert len(dev.lifecycle.ctx.slots.installed()) <= 3
    rec = dev.lifecycle.record
    assert set(dev.lifecycle.ctx.slots.installed()) == {rec.active, rec.previous}
    assert list((dev.dir / "state/bundles").glob(".tmp-*")) == []


@pytest.mark.integration
def test_shadow_runs_beside_serving_and_is_never_served(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path)
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0", shadow="mlp-2.0.0"))
    dev.lifecycle.run_until_stable()
    assert dev.holder.shadow_id == "mlp-2.0.0" and dev.lifecycle.record.shadow == "mlp-2.0.0"
    for _ in range(20):
        _serves(dev.holder, 0)
    deadline = time.monotonic() + 5
    while dev.holder.shadow_report().compared < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    rep = dev.holder.shadow_report()
    assert rep.compared == 20 and rep.dropped == 0 and rep.mean_abs_diff is not None and rep.mean_abs_diff > 0
    assert rep.label_agreement is not None and 0 <= rep.label_agreement <= 1
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0"))
    dev.lifecycle.run_until_stable()
    assert dev.holder.shadow_id is None


@pytest.mark.integration
def test_a_failing_shadow_is_quarantined_without_touching_serving(repo: Repo, tmp_path: Path) -> None:
    dev = _installed(repo, tmp_path)

    def refuse_shadow(path, manifest, threads):  # type: ignore[no-untyped-def]
        if manifest.version == "2.0.0":
            from agent.errors import RuntimeFailure

            raise RuntimeFailure("runtime refuses this model")
        return load_model(path, manifest, threads)

    dev.lifecycle.ctx.load = refuse_shadow
    d = repo.desired("mlp-1.0.0", shadow="mlp-2.0.0")
    dev.lifecycle.offer_desired(d)
    dev.lifecycle.run_until_stable()
    assert dev.event("shadow_failed")["bundle"] == "mlp-2.0.0"
    assert dev.holder.shadow_id is None and dev.lifecycle.record.quarantined == {"mlp-2.0.0": d.sequence}
    n = len(dev.events)
    dev.lifecycle.run_until_stable()  # not retried under the same document
    assert len(dev.events) == n
    _serves(dev.holder, 0)


@pytest.mark.integration
def test_on_save_sees_every_saved_state(repo: Repo, tmp_path: Path) -> None:
    from agent.lifecycle import Lifecycle, LifecycleConfig
    from agent.serving.model_holder import ModelHolder

    saved: list[str] = []
    holder = ModelHolder()
    lc = Lifecycle(LifecycleConfig(state_dir=tmp_path / "state"), holder, repo.trust(tmp_path),
                   on_save=lambda rec: saved.append(rec.state))
    lc.offer_desired(repo.desired("mlp-1.0.0"))
    lc.start()
    assert saved == ["idle", "downloading", "verifying", "staged", "activating", "probation", "committed",
                     "idle"]
    holder.close()


@pytest.mark.integration
def test_run_forever_rests_in_idle_until_woken_or_a_backoff_runs_out(repo: Repo, tmp_path: Path) -> None:
    """Idle costs nothing per poll (no step, no record fingerprint); new work still starts at once."""
    from agent.errors import TransportError

    dev = _installed(repo, tmp_path, retry_base_s=0.2, retry_max_s=0.2)
    lc = dev.lifecycle
    steps = []
    real_step = lc.machine.step

    def counting_step() -> State:
        steps.append(lc.state)
        return real_step()

    lc.machine.step = counting_step  # type: ignore[method-assign]
    real_download = lc.ctx.trust.download_target
    calls: list[str] = []

    def flaky(path, expected=None):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 1:
            raise TransportError("broker went away")
        return real_download(path, expected)

    lc.ctx.trust.download_target = flaky  # type: ignore[method-assign]
    lc.ctx.wake.clear()  # (set by the offer in `_installed`)
    stop = threading.Event()
    ticks: list[float] = []
    runner = threading.Thread(
        target=lc.run_forever, args=(stop, 0.005, lambda: ticks.append(time.monotonic()), 3600.0)
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while len(ticks) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ticks) >= 40 and steps == [State.IDLE]  # one settle, then rest: heartbeats only
        lc.offer_desired(repo.desired("mlp-2.0.0"))  # the wake starts it; the download fails once
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        # ...and the retry starts when the backoff runs out, with nobody waking the machine
        while lc.record.active != "mlp-2.0.0" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lc.record.active == "mlp-2.0.0" and len(calls) == 2
    finally:
        stop.set()
        runner.join(10)
    assert not runner.is_alive()


@pytest.mark.integration
def test_a_slot_references_the_bundles_manifest_and_old_slots_still_open(repo: Repo, tmp_path: Path) -> None:
    import json

    from agent.errors import EdgefleetError
    from agent.lifecycle.slots import SLOT_FILE

    dev = _installed(repo, tmp_path)
    slots = dev.lifecycle.ctx.slots
    slot = slots.open("mlp-1.0.0")
    doc = json.loads((slot.root / SLOT_FILE).read_text())
    assert "manifest" not in doc and (slot.root / doc["manifest_path"]).is_file()
    # a slot written by an earlier agent embeds the manifest: it must still open the same
    old = {k: v for k, v in doc.items() if k != "manifest_path"}
    old["manifest"] = json.loads(slot.manifest.to_json())
    (slot.root / SLOT_FILE).write_text(json.dumps(old))
    assert slots.open("mlp-1.0.0").manifest == slot.manifest
    # a damaged manifest file is refused, not served
    (slot.root / SLOT_FILE).write_text(json.dumps(doc))
    (slot.root / doc["manifest_path"]).write_text("{not json")
    with pytest.raises(EdgefleetError):
        slots.open("mlp-1.0.0")


@pytest.mark.integration
def test_a_state_that_cannot_be_saved_backs_off_and_the_lifecycle_thread_survives(
    repo: Repo, tmp_path: Path
) -> None:
    """Disk full at the worst moment: the record cannot be saved. The lifecycle must not act
    without it, must not die either (it is the thread that installs updates), and must go on
    once the disk has room again."""
    import errno

    dev = _installed(repo, tmp_path)
    lc = dev.lifecycle
    real_save = lc.machine.store.save
    failures: list[str] = []

    def full_disk_save(record):  # type: ignore[no-untyped-def]
        if len(failures) < 2:
            failures.append(record.state)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(record)

    lc.machine.store.save = full_disk_save  # type: ignore[method-assign]
    stop = threading.Event()
    runner = threading.Thread(target=lc.run_forever, args=(stop, 0.01))
    runner.start()
    try:
        lc.offer_desired(repo.desired("mlp-2.0.0"))
        deadline = time.monotonic() + 30
        while lc.record.active != "mlp-2.0.0" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.is_alive() and len(failures) == 2
        assert lc.record.active == "mlp-2.0.0"
    finally:
        stop.set()
        runner.join(10)
