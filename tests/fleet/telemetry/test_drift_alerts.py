"""Drift alerts: one per episode, retraining after persistent drift, webhook and command delivery."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.errors import FleetMisuseError
from fleet.registry.profile import compute_reference_profile
from fleet.telemetry.alert_delivery import deliver, strict_json
from fleet.telemetry.alerts import AlertConfig, AlertManager
from fleet.telemetry.drift import DriftThresholds
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from tests.support.postgres import Backend
from tests.support.telemetry import WebhookRecorder, webhook_server

RNG = np.random.default_rng(11)
REF = RNG.normal(size=(6000, 4))
PROFILE = compute_reference_profile(REF, list("abcd"), outputs=REF.sum(axis=1))


@pytest.fixture
def webhook() -> Iterator[tuple[str, type[WebhookRecorder]]]:
    with webhook_server("/alerts") as hook:
        yield hook


def _windows(backend: Backend, shifts: list[float] | list[list[float]]) -> TelemetryStore:
    """Three devices, one report per window; a shift is for every feature or one per feature."""
    store = TelemetryStore(backend.location("telemetry.db"), IngestConfig(window_s=60.0),
                           profiles=lambda m, v: PROFILE, clock=lambda: 1e6)
    for d in range(3):
        ticks = iter([60.0 * i + 1.0 for i in range(len(shifts) + 1)])
        sk = TelemetrySketch(PROFILE, f"dev-{d}", "m", "1.0.0", clock=ticks.__next__,
                             resource_probe=lambda: (0, 0.0, 0.0))
        for shift in shifts:
            x = RNG.normal(np.broadcast_to(np.asarray(shift, dtype=float), (4,)), 1.0, size=(700, 4))
            sk.update(x, x.sum(axis=1), 0.001)
            assert store.ingest(encode_report(sk.snapshot_and_reset())) == "accepted"
    return store


@pytest.mark.integration
def test_alerts_once_per_episode_and_retrain_after_persistent_drift(
    backend: Backend, tmp_path: Path, webhook: tuple[str, type[WebhookRecorder]]
) -> None:
    url, hook = webhook
    out = tmp_path / "command.jsonl"
    command = (sys.executable, "-c", f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')")
    store = _windows(backend, [0.0, 0.0, 0.6, 0.6, 0.6, 0.6, 0.0, 0.6])
    # clear_windows=1: an episode ends at the first clean window (the default waits for 2)
    config = AlertConfig(persist_windows=3, webhook_url=url, command=command, clear_windows=1)
    mgr = AlertManager(backend.location("alerts.db"), config, clock=lambda: 5.0)
    windows = store.windows("m", "1.0.0", cohort="")
    assert len(windows) == 8
    fired = mgr.evaluate("m", "1.0.0", "", PROFILE, windows, 60.0)
    drift = [a for a in fired if a.kind == "drift"]
    retrain = [a for a in fired if a.kind == "retrain"]
    subjects = {"a", "b", "c", "d", "output:output_0", "dataset", "prediction"}
    # two episodes (windows 2-5 and 7): one alert per subject and episode, not one per window
    assert sorted(a.subject for a in drift) == sorted([*subjects, *subjects])
    assert {a.window_start for a in drift} == {180.0, 480.0}  # intervals end at 61, 121, 181 ... s
    assert sorted((a.subject, a.window_start, a.windows) for a in retrain) == [
        ("dataset", 300.0, 3), ("prediction", 300.0, 3)]
    assert all(a.devices == ["dev-0", "dev-1", "dev-2"] and a.device_count == 3 for a in fired)
    dataset = next(a for a in drift if a.subject == "dataset")
    assert dataset.statistic == "drift_share" and dataset.value == 1.0 and dataset.threshold == 0.5
    assert len(hook.received) == len(fired) and {r["kind"] for r in hook.received} == {"drift", "retrain"}
    assert len(out.read_text().splitlines()) == len(fired)
    assert all(mgr.delivery_state(a.id or 0) == (True, "") for a in fired)
    # windows already evaluated are not evaluated again; the state survives a reopen
    mgr.close()
    again = AlertManager(backend.location("alerts.db"), AlertConfig(persist_windows=3), clock=lambda: 6.0)
    assert again.evaluate("m", "1.0.0", "", PROFILE, windows, 60.0) == []
    assert len(again.alerts(kind="retrain")) == 2 and len(again.alerts(model="m")) == len(fired)


@pytest.mark.integration
def test_an_episode_ends_only_after_clean_windows_so_flapping_alerts_once(backend: Backend) -> None:
    # drift, one clean window, drift again (flapping), then two clean windows, then drift: two episodes
    store = _windows(backend, [0.6, 0.0, 0.6, 0.0, 0.0, 0.6])
    mgr = AlertManager(backend.location("alerts.db"), AlertConfig(clear_windows=2), clock=lambda: 5.0)
    fired = mgr.evaluate("m", "1.0.0", "", PROFILE, store.windows("m", "1.0.0"), 60.0)
    dataset = [a for a in fired if a.kind == "drift" and a.subject == "dataset"]
    assert [(a.window_start, a.escalation) for a in dataset] == [(60.0, 0), (360.0, 0)]  # windows 1, 6
    assert dataset[0].episode == dataset[0].id and dataset[1].episode == dataset[1].id  # each opened one
    assert dataset[0].features == ["a", "b", "c", "d"]
    assert sorted(a.subject for a in fired if a.kind == "drift") == sorted(
        [*"abcd", "output:output_0", "dataset", "prediction"] * 2)
    # the retraining trigger counts consecutive drifted windows: never 3 in a row here
    assert not [a for a in fired if a.kind == "retrain"]


@pytest.mark.integration
def test_new_drifted_features_escalate_the_open_episode(backend: Backend) -> None:
    # `a` drifts alone (a spurious start), then a, b, c drift together, then b leaves and returns
    store = _windows(backend, [[1.0, 0, 0, 0], [1.0, 1.0, 1.0, 0], [1.0, 0, 1.0, 0], [1.0, 1.0, 1.0, 0]])
    # a share of 0.25: one drifted feature of four is a dataset drift
    config = AlertConfig(persist_windows=10, thresholds=DriftThresholds(dataset_drift_share=0.25))
    mgr = AlertManager(backend.location("alerts.db"), config, clock=lambda: 5.0)
    fired = mgr.evaluate("m", "1.0.0", "", PROFILE, store.windows("m", "1.0.0"), 60.0)
    dataset = [a for a in fired if a.subject == "dataset"]
    assert [(a.window_start, a.escalation, a.features) for a in dataset] == [
        (60.0, 0, ["a"]), (120.0, 1, ["a", "b", "c"])]  # b's return in window 3 is no news
    opened, escalated = dataset
    assert escalated.episode == opened.id != escalated.id and escalated.detail.endswith("b, c")
    assert sorted(a.subject for a in fired if a.subject in "abcd") == ["a", "b", "c"]  # b: one episode
    # the state survives a reopen: the escalation is not sent again
    mgr.close()
    again = AlertManager(backend.location("alerts.db"), config)
    assert again.evaluate("m", "1.0.0", "", PROFILE, store.windows("m", "1.0.0"), 60.0) == []
    listed = again.page()
    assert [(r["escalation"], r["features"]) for r in listed if r["subject"] == "dataset"] == [
        (1, ["a", "b", "c"]), (0, ["a"])]


@pytest.mark.integration
def test_failed_delivery_is_recorded_and_retried(
    backend: Backend, tmp_path: Path, webhook: tuple[str, type[WebhookRecorder]]
) -> None:
    url, hook = webhook
    hook.status = 503
    store = _windows(backend, [0.6])
    failing = (sys.executable, "-c", "import sys; sys.exit(3)")
    mgr = AlertManager(backend.location("alerts.db"), AlertConfig(webhook_url=url, command=failing))
    fired = mgr.evaluate("m", "1.0.0", "", PROFILE, store.windows("m", "1.0.0"), 60.0)
    assert fired and all(a.kind == "drift" for a in fired)
    delivered, error = mgr.delivery_state(fired[0].id or 0)
    assert not delivered and "503" in error and "exited 3" in error
    hook.status = 200
    mgr.config = AlertConfig(webhook_url=url)
    assert mgr.redeliver() == len(fired) and mgr.redeliver() == 0
    unreachable = AlertManager(tmp_path / "b.db", AlertConfig(webhook_url="http://127.0.0.1:9/x",
                                                              webhook_timeout_s=2.0))
    got = unreachable.evaluate("m", "1.0.0", "", PROFILE, store.windows("m", "1.0.0"), 60.0)
    assert not unreachable.delivery_state(got[0].id or 0)[0]


@pytest.mark.integration
def test_an_alerts_db_of_the_drift_only_fleet_is_upgraded_and_its_alerts_read_back(tmp_path: Path) -> None:
    # an alerts.db as the pre-Alembic fleet left it (no alembic_version): drift_alerts without
    # the episode columns, one alert and one open drift episode in it
    path = tmp_path / "alerts.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE drift_alerts (id INTEGER PRIMARY KEY, kind TEXT, model TEXT, version TEXT, "
            "cohort TEXT, subject TEXT, statistic TEXT, value FLOAT, threshold FLOAT, window_start FLOAT, "
            "window_s FLOAT, windows INTEGER, devices TEXT, device_count INTEGER, created_at FLOAT, "
            "delivered INTEGER, delivery_error TEXT);"
            "CREATE TABLE drift_episodes (model TEXT, version TEXT, cohort TEXT, subject TEXT, "
            "first_window FLOAT, last_window FLOAT, consecutive INTEGER, retrain_fired INTEGER, "
            "PRIMARY KEY (model, version, cohort, subject));"
            "INSERT INTO drift_alerts VALUES (7, 'drift', 'm', '1.0.0', '', 'a', 'psi', 0.4, 0.2, 0.0, 60.0, "
            "1, '[\"d0\"]', 1, 1.0, 1, '');"
            "INSERT INTO drift_episodes VALUES ('m', '1.0.0', '', 'a', 0.0, 0.0, 1, 0);")
    conn.close()
    mgr = AlertManager(path, AlertConfig(clear_windows=1), clock=lambda: 5.0)
    (old,) = mgr.alerts()
    assert (old.id, old.episode, old.escalation, old.features, old.evidence, old.devices) == (
        7, 7, 0, [], {}, ["d0"])
    assert mgr.page()[0]["episode"] == 7 and mgr.delivery_state(7) == (True, "")
    # the episode the old fleet left open goes on: feature `a` drifting again is no new alert
    store = _windows(Backend("sqlite", tmp_path), [0.6])
    fired = mgr.evaluate("m", "1.0.0", "", PROFILE, store.windows("m", "1.0.0"), 60.0)
    assert "a" not in {a.subject for a in fired} and {"b", "dataset"} <= {a.subject for a in fired}
    assert all(a.episode == a.id for a in fired)
    mgr.close()
    with sqlite3.connect(path) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(drift_episodes)")}
        assert columns >= {"clear_streak", "alert_id"}
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("alerts_0002",)
    conn.close()
    store.close()


@pytest.mark.integration
def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FleetMisuseError):
        AlertConfig(persist_windows=0)
    bad = tmp_path / "x.db"
    bad.write_bytes(b"not sqlite" * 200)
    with pytest.raises(FleetMisuseError):
        AlertManager(bad)


@pytest.mark.integration
def test_delivery_sends_strict_json_without_nan_or_infinity(tmp_path: Path) -> None:
    out = tmp_path / "got.json"
    strict = (sys.executable, "-c", "import json, sys; doc = json.loads(sys.stdin.read(), parse_constant="
              f"lambda c: sys.exit(4)); open({str(out)!r}, 'w').write(json.dumps(doc))")
    body = {"value": float("nan"), "evidence": {"z": float("inf"), "n": 3.0},
            "features": [1.0, float("-inf")]}
    assert deliver(body, None, strict, 5.0, 30.0) == []
    assert json.loads(out.read_text()) == {"value": None, "evidence": {"z": None, "n": 3.0},
                                           "features": [1.0, None]}
    # what Python's json.dumps writes by default is refused by that receiver: the check can fail
    refused = subprocess.run(strict, input=json.dumps(body), text=True, capture_output=True, check=False)
    assert refused.returncode == 4
    assert strict_json({"a": (float("nan"),)}) == {"a": [None]}
