"""Crash at every state, restart, and end up serving a verified model.

In-process: a handler raises a `BaseException` the driver does not catch, leaving the
record exactly as saved before that state's action. Out-of-process: the real harness
process is SIGKILLed while it sits in each state, then started again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.errors import TransportError
from agent.lifecycle import State
from agent.lifecycle.install import HANDLERS
from simulators.models import mlp_reference, mlp_weights
from tests.support.lifecycle_world import Repo, X, make_device, make_repo

ROOT = Path(__file__).resolve().parents[3]
SEEDS = {"mlp-1.0.0": 0, "mlp-2.0.0": 1}


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    r = make_repo(tmp_path_factory.mktemp("repo"))
    r.publish("1.0.0", model_seed=0)
    r.publish("2.0.0", model_seed=1)
    r.publish("3.0.0", model_seed=2, golden_seed=0)  # fails golden vectors
    return r


def _scenario(state: State) -> str:
    """Which update passes through `state` when it is entered the first time."""
    return {State.ROLLING_BACK: "mlp-3.0.0"}.get(state, "mlp-2.0.0")


def _assert_serving_verified(dev, expect: set[str]) -> None:  # type: ignore[no-untyped-def]
    rec = dev.lifecycle.record
    assert dev.lifecycle.state is State.IDLE
    assert rec.active in expect and dev.holder.bundle_id == rec.active
    out = dev.holder.predict({"x": X})["logits"]
    np.testing.assert_allclose(out, mlp_reference(X, mlp_weights(SEEDS[rec.active])), rtol=1e-4, atol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("crashes", [1, 2])
def test_crash_in_every_state_resumes_to_a_verified_model(
    repo: Repo, tmp_path: Path, state: State, crashes: int
) -> None:
    dev = make_device(repo, tmp_path / "dev")
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0"))
    dev.lifecycle.start()
    if state is State.FAILED:  # reach FAILED through a transport failure
        def down(path, expected=None):  # type: ignore[no-untyped-def]
            raise TransportError("broker went away")
        dev.lifecycle.ctx.trust.download_target = down  # type: ignore[method-assign]
    target = _scenario(state)
    entered = []

    for attempt in range(crashes):
        def crash(ctx, _s=state):  # type: ignore[no-untyped-def]
            entered.append(_s)
            raise Crash(_s.value)

        dev.lifecycle.machine.handlers[state] = crash
        if attempt == 0:
            dev.lifecycle.offer_desired(repo.desired(target))
            with pytest.raises(Crash):
                dev.lifecycle.run_until_stable()
        else:  # crash again in the same state if the restart passes through it
            try:
                dev.lifecycle.start()
            except Crash:
                pass
            else:
                break
        dev.holder.close()  # the process is gone: so are its models
        on_disk = json.loads((tmp_path / "dev/state/state.json").read_text())
        if attempt == 0:
            assert on_disk["state"] == state.value  # saved before the action
        dev = make_device(repo, tmp_path / "dev")
    assert entered and set(entered) == {state}
    if state is State.PROBATION:
        assert len(entered) == 1  # a restart never re-enters probation: it rolls back
    dev.lifecycle.start()
    rec = dev.lifecycle.record
    if state in (State.PROBATION, State.ROLLING_BACK):
        assert rec.active == "mlp-1.0.0" and target in rec.quarantined
    _assert_serving_verified(dev, {"mlp-1.0.0", "mlp-2.0.0"})


@pytest.mark.integration
def test_corrupt_state_file_falls_back_and_still_serves(repo: Repo, tmp_path: Path) -> None:
    dev = make_device(repo, tmp_path / "dev")
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0"))
    dev.lifecycle.start()
    dev.lifecycle.offer_desired(repo.desired("mlp-2.0.0"))
    dev.lifecycle.run_until_stable()
    dev.holder.close()
    (tmp_path / "dev/state/state.json").write_bytes(b'{"schema_version": 1, "sta')  # torn write
    dev = make_device(repo, tmp_path / "dev")
    dev.lifecycle.start()
    _assert_serving_verified(dev, {"mlp-1.0.0", "mlp-2.0.0"})


def _harness(cfg: Path, pause_at: str | None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGEFLEET_HARNESS_PAUSE_AT", None)
    if pause_at:
        env["EDGEFLEET_HARNESS_PAUSE_AT"] = pause_at
    return subprocess.Popen([sys.executable, "-m", "tests.support.lifecycle_process", str(cfg)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.mark.integration
@pytest.mark.parametrize("state", [s for s in State if s is not State.FAILED])
def test_sigkill_in_each_state_then_restart_serves(repo: Repo, tmp_path: Path, state: State) -> None:
    assert set(HANDLERS) == set(State)
    dev = make_device(repo, tmp_path / "dev")  # install 1.0.0 in-process first
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0"))
    dev.lifecycle.start()
    dev.holder.close()
    target = _scenario(state)
    cfg = tmp_path / "harness.json"
    doc = {
        "repo_dir": str(repo.repo.repo_dir),
        "bootstrap_root": str(repo.repo.metadata_dir / "1.root.json"),
        "device_dir": str(tmp_path / "dev"),
        "desired": repo.desired(target).to_dict(),
        "probe": X.tolist(),
    }
    cfg.write_text(json.dumps(doc))
    proc = _harness(cfg, state.value)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("paused"):
            assert line.split()[1] == state.value
            break
    else:
        pytest.fail(f"harness never reached {state.value}: rc={proc.wait()}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    assert json.loads((tmp_path / "dev/state/state.json").read_text())["state"] == state.value
    cfg.write_text(json.dumps({**doc, "desired": None}))
    out, _ = _harness(cfg, None).communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["state"] == "idle" and result["serving"] == result["active"]
    assert result["active"] in SEEDS
    if state in (State.PROBATION, State.ROLLING_BACK):
        assert result["active"] == "mlp-1.0.0" and target in result["quarantined"]
    ref = mlp_reference(X, mlp_weights(SEEDS[result["active"]]))
    np.testing.assert_allclose(np.array(result["output"]), ref, rtol=1e-4, atol=1e-5)
