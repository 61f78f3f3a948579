"""A power cut at every point of an update leaves a device that serves a verified model.

SIGKILL tests (test_lifecycle_crash.py) cannot see a missing fsync: the page cache survives
a killed process. Here every `os.fsync` of an update is recorded (`tests/support/power_cut.py`),
and for every cut point the device directory is rebuilt from only what had been made
durable, in two variants: only fsynced names and contents, and every name as it was but
contents only as fsynced. A fresh lifecycle then starts on that directory, is offered the
same director document again (the fleet's retained document arrives on every reconnect), and
must end in `idle`, serving a model whose outputs are the reference outputs of its bundle:
the update's bundle, or the previous one if the cut came during probation (a restart from
probation rolls back by design: the new model may be what crashed the device).
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from agent.daemon.events import EventOutbox
from agent.lifecycle import DesiredTarget, State, StateStore
from agent.telemetry.queue import ReportQueue
from simulators.models import mlp_reference, mlp_weights
from tests.support.lifecycle_world import Repo, X, make_device, make_repo
from tests.support.power_cut import MODES, recording

ROOT = Path(__file__).resolve().parents[3]
SEEDS = {"mlp-1.0.0": 0, "mlp-2.0.0": 1}
ROLLED_BACK_FROM = {State.PROBATION.value, State.ROLLING_BACK.value}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    r = make_repo(tmp_path_factory.mktemp("repo"))
    r.publish("1.0.0", model_seed=0)
    r.publish("2.0.0", model_seed=1)
    r.publish("3.0.0", model_seed=2, golden_seed=0)  # fails its golden vectors: rolled back
    return r


def _outcome(repo: Repo, dev_dir: Path, target: DesiredTarget, expect: str) -> tuple[str | None, str]:
    """Start on `dev_dir`, offer `target` again, settle; (serving bundle, problem or "")."""
    dev = make_device(repo, dev_dir)
    try:
        dev.lifecycle.start()
        dev.lifecycle.offer_desired(target)
        dev.lifecycle.run_until_stable()
        rec = dev.lifecycle.record
        if dev.lifecycle.state is not State.IDLE or dev.holder.bundle_id != rec.active:
            return rec.active, f"state {dev.lifecycle.state.value}, serving {dev.holder.bundle_id}"
        if rec.active not in SEEDS:
            return rec.active, f"serving {rec.active} (last error: {rec.last_error})"
        out = dev.holder.predict({"x": X})["logits"]
        ref = mlp_reference(X, mlp_weights(SEEDS[rec.active]))
        if not np.allclose(out, ref, rtol=1e-4, atol=1e-5):
            return rec.active, "outputs are not the bundle's reference outputs"
        return rec.active, "" if rec.active == expect else (
            f"serving {rec.active}, expected {expect} (quarantined {sorted(rec.quarantined)}, "
            f"last error: {rec.last_error})")
    finally:
        dev.holder.close()


@pytest.mark.integration
@pytest.mark.parametrize("bundle", ["mlp-2.0.0", "mlp-3.0.0"])
def test_power_cut_at_every_fsync_of_an_update_still_serves_a_verified_model(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle: str
) -> None:
    dev_dir = tmp_path / "dev"
    dev = make_device(repo, dev_dir)
    dev.lifecycle.offer_desired(repo.desired("mlp-1.0.0"))
    dev.lifecycle.start()  # the starting point: 1.0.0 committed (taken as durable)
    target = repo.desired(bundle)
    with recording(dev_dir, monkeypatch) as rec:
        dev.lifecycle.offer_desired(target)
        dev.lifecycle.run_until_stable()
    dev.holder.close()
    good = bundle in SEEDS
    assert dev.lifecycle.record.active == (bundle if good else "mlp-1.0.0")
    assert len(rec.snapshots) > 10, "the update made (almost) nothing durable"

    problems: list[str] = []
    seen: set[tuple[str, bytes]] = set()
    for mode in MODES:
        for k in rec.cuts():
            rec.rebuild(k, mode, dev_dir)
            durable = StateStore(dev_dir / "state").load()
            cut_during_probation = durable.state in ROLLED_BACK_FROM and durable.candidate == bundle
            expect = bundle if good and not cut_during_probation else "mlp-1.0.0"
            _serving, problem = _outcome(repo, dev_dir, target, expect)
            if problem:
                key = (mode, durable.to_json())
                if key not in seen:
                    seen.add(key)
                    last = rec.durable_state(k)[-1:] or ["(before the first fsync)"]
                    problems.append(f"{mode} cut {k} after [{last[0]}], record {durable.state}: {problem}")
    shutil.rmtree(dev_dir, ignore_errors=True)
    assert not problems, "\n".join(problems)


@pytest.mark.unit
def test_the_sqlite_stores_are_durable_at_commit(tmp_path: Path) -> None:
    """WAL + synchronous=FULL: a committed report or event survives a power cut (with NORMAL,
    SQLite keeps the database consistent but may lose the last commits)."""
    queue = ReportQueue(tmp_path / "telemetry.sqlite")
    outbox = EventOutbox(tmp_path / "events.sqlite")
    try:
        for db in (queue._db, outbox._db):
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        queue.close()
        outbox.close()
    for name in ("telemetry.sqlite", "events.sqlite"):  # the settings are per connection: no leftovers
        with sqlite3.connect(tmp_path / name) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


#: fsyncs allowed outside `agent.durable_io`: the MQTT fetcher's spool (its own batching of
#: fsyncs; the resume file's known limit is described in docs/agent.md, "Known limits").
OWN_FSYNC = {"agent/transport/mqtt_fetcher.py"}


@pytest.mark.unit
def test_every_fsync_of_the_agent_goes_through_durable_io() -> None:
    """The power-cut test records `os.fsync`; one module doing it keeps the rules in one place."""
    offenders = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "agent/durable_io.py" or rel in OWN_FSYNC:
            continue
        if re.search(r"\bos\.(fsync|fdatasync)\(", path.read_text()):
            offenders.append(rel)
    assert offenders == []
