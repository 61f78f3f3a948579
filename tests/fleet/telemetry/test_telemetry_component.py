"""The drift monitor over real SQLite, real encoded reports and a real local webhook server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agent.contract.manifest import ReferenceProfile
from fleet.settings import FleetSettings, TelemetrySettings
from fleet.store import Store
from fleet.telemetry.alerts import AlertConfig, AlertManager
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from fleet.telemetry.monitor import BundleProfiles, DriftMonitor, alert_config, build_drift_monitor
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from tests.support.fakes import DIGEST, FakeClock
from tests.support.telemetry import (
    MLP_FEATURES,
    T0,
    WebhookRecorder,
    column_shift,
    difference_output,
    encoded_reports,
    mlp_outputs,
    publish_mlp,
    small_profile,
    webhook_server,
)

PROFILE = small_profile(difference_output)  # inputs a..d, output a - b
SHIFTED = [0.0, 0.0, 0.8, 0.8, 0.8, 0.8]  # windows 1..6: drift from window 3 on, every feature


@pytest.fixture
def webhook() -> Iterator[tuple[str, type[WebhookRecorder]]]:
    with webhook_server("/hooks/drift") as hook:
        yield hook


def _store(tmp_path: Path, profiles: dict[tuple[str, str], ReferenceProfile]) -> TelemetryStore:
    return TelemetryStore(tmp_path / "telemetry.db", IngestConfig(window_s=60.0),
                          profiles=lambda m, v: profiles.get((m, v)), clock=lambda: T0 + 100_000)


def _ingest(store: TelemetryStore, payloads: list[bytes]) -> None:
    assert {store.ingest(p) for p in payloads} == {"accepted"}


def _closed_after(k: int, settle_s: float = 30.0) -> float:
    """The first time at which windows 1..k are closed (window k starts at T0 + 60 k)."""
    return T0 + 60.0 * k + 60.0 + settle_s


@pytest.mark.integration
def test_persisting_episode_fires_exactly_one_trigger_to_the_webhook(
    tmp_path: Path, webhook: tuple[str, type[WebhookRecorder]]
) -> None:
    url, hook = webhook
    clock = FakeClock(_closed_after(4))
    telemetry = _store(tmp_path, {("m", "1.0.0"): PROFILE})
    _ingest(telemetry, encoded_reports(PROFILE, "m", "1.0.0", "eu", 3, SHIFTED, difference_output))
    config = AlertConfig(persist_windows=3, webhook_url=url)
    alerts = AlertManager(tmp_path / "alerts.db", config, clock=clock)
    monitor = DriftMonitor(telemetry, alerts, lambda m, v: PROFILE, TelemetrySettings(settle_s=30.0),
                           clock=clock)

    first = monitor.run_once()  # windows 1-4 closed: drift in 3 and 4, episode 2 windows long
    assert sorted(a.subject for a in first) == ["a", "b", "c", "d", "dataset"]
    assert {a.kind for a in first} == {"drift"}
    assert monitor.evaluations == 4
    (gauge,) = monitor.snapshot()
    assert gauge.window_start == T0 + 240.0  # window 5 is still open: not evaluated yet
    assert [f.name for f in gauge.report.features if f.drifted] == ["a", "b", "c", "d"]
    assert gauge.report.dataset_drift and not gauge.report.prediction_drift

    clock.now = _closed_after(6)
    second = monitor.run_once()  # windows 5-6: the dataset episode reaches 4 >= 3 windows
    assert [(a.kind, a.subject) for a in second] == [("retrain", "dataset")]
    assert second[0].windows == 3 and second[0].device_count == 3
    assert monitor.run_once() == []  # nothing new: no repeated alerts for the same episode
    clock.advance(600)
    assert monitor.run_once() == []

    kinds = [(h["kind"], h["subject"]) for h in hook.received]
    assert kinds.count(("retrain", "dataset")) == 1
    assert len(hook.received) == 6 and all(h["model"] == "m" and h["cohort"] == "eu" for h in hook.received)
    assert all(alerts.delivery_state(a.id or 0)[0] for a in first + second)
    monitor.stop()
    telemetry.close()


@pytest.mark.integration
def test_failed_deliveries_are_retried_on_the_next_cycle(
    tmp_path: Path, webhook: tuple[str, type[WebhookRecorder]]
) -> None:
    url, hook = webhook
    hook.status = 500
    clock = FakeClock(_closed_after(4))
    telemetry = _store(tmp_path, {("m", "1.0.0"): PROFILE})
    _ingest(telemetry, encoded_reports(PROFILE, "m", "1.0.0", "", 2, [0.8, 0.8, 0.8, 0.8], difference_output))
    config = AlertConfig(persist_windows=2, webhook_url=url)
    alerts = AlertManager(tmp_path / "alerts.db", config, clock=clock)
    monitor = DriftMonitor(telemetry, alerts, lambda m, v: PROFILE, TelemetrySettings(settle_s=30.0),
                           clock=clock)
    fired = monitor.run_once()
    assert any(a.kind == "retrain" for a in fired)
    states = [alerts.delivery_state(a.id or 0) for a in fired]
    assert all(not ok and "500" in err for ok, err in states)
    attempts = len(hook.received)

    hook.status = 200
    assert monitor.run_once() == []  # no new alert, but every failed one goes out again
    assert len(hook.received) == attempts + len(fired)
    assert all(alerts.delivery_state(a.id or 0) == (True, "") for a in fired)
    monitor.stop()
    telemetry.close()


@pytest.mark.integration
def test_bad_keys_are_counted_and_skipped_without_stopping_the_others(tmp_path: Path) -> None:
    other = small_profile(seed=3)
    three = ReferenceProfile(features=other.features[:3], outputs=other.outputs)  # not what was sent
    telemetry = _store(tmp_path, {("m", "1.0.0"): PROFILE, ("m", "2.0.0"): PROFILE, ("m", "3.0.0"): PROFILE})
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        _ingest(telemetry, encoded_reports(PROFILE, "m", version, "", 2, [0.0, 0.8], difference_output))
    lookup = {("m", "1.0.0"): PROFILE, ("m", "2.0.0"): three}.get
    clock = FakeClock(_closed_after(2))
    alerts = AlertManager(tmp_path / "alerts.db", AlertConfig(), clock=clock)
    monitor = DriftMonitor(telemetry, alerts, lambda m, v: lookup((m, v)), TelemetrySettings(), clock=clock)
    fired = monitor.run_once()
    assert monitor.evaluation_errors == 1  # 2.0.0: its windows do not match the profile given
    assert monitor.unprofiled == {("m", "3.0.0")}  # no profile: skipped, logged once
    assert {a.version for a in fired} == {"1.0.0"}
    assert [(g.version) for g in monitor.snapshot()] == ["1.0.0"]
    monitor.stop()
    telemetry.close()


@pytest.mark.integration
def test_background_loop_runs_cycles_and_stops(tmp_path: Path) -> None:
    telemetry = _store(tmp_path, {("m", "1.0.0"): PROFILE})
    _ingest(telemetry, encoded_reports(PROFILE, "m", "1.0.0", "", 2, [0.0, 0.8, 0.8], difference_output))
    clock = FakeClock(_closed_after(3))
    alerts = AlertManager(tmp_path / "alerts.db", AlertConfig(persist_windows=2), clock=clock)
    monitor = DriftMonitor(telemetry, alerts, lambda m, v: PROFILE,
                           TelemetrySettings(evaluate_interval_s=0.05), clock=clock)
    monitor.start()
    done = threading.Event()
    for _ in range(400):
        if monitor.cycles >= 2:
            break
        done.wait(0.025)
    monitor.stop()
    assert monitor.cycles >= 2
    reader = AlertManager(tmp_path / "alerts.db")
    assert [a.subject for a in reader.alerts(kind="retrain")] == ["dataset"]
    reader.close()
    telemetry.close()


@pytest.mark.integration
def test_profiles_come_from_published_bundles_and_feed_the_gate_score(tmp_path: Path) -> None:
    settings = FleetSettings(data_dir=tmp_path / "fleet")
    store = Store(settings.db_path)
    profile = publish_mlp(settings, store, "1.0.0", tmp_path)
    store.models.register_version("mlp", "2.0.0", DIGEST, "onnx", {}, "test")  # no bundle target
    profiles = BundleProfiles(store, Repository(settings.repo_dir, KeyStore(settings.keys_dir)))
    assert profiles("mlp", "1.0.0") == profile and [f.name for f in profile.features] == MLP_FEATURES
    assert profiles("mlp", "2.0.0") is None and profiles("nope", "1.0.0") is None

    telemetry = TelemetryStore(settings.telemetry_db_path, profiles=profiles, clock=lambda: T0 + 100_000)
    shift = column_shift(32, range(20), 1.5)  # 20 of 32 features: more than half drift
    _ingest(telemetry, encoded_reports(profile, "mlp", "1.0.0", "", 2, [shift, shift], mlp_outputs))
    monitor = build_drift_monitor(settings, store, telemetry, clock=FakeClock(_closed_after(2)))
    assert monitor.drift_score("mlp", "1.0.0", since=T0) == pytest.approx(20 / 32)
    assert monitor.drift_score("mlp", "2.0.0", since=T0) is None
    fired = monitor.run_once()
    assert sorted(a.subject for a in fired if a.subject.startswith("feat")) == sorted(MLP_FEATURES[:20])
    monitor.stop()
    telemetry.close()
    store.close()


@pytest.mark.unit
def test_telemetry_settings_from_the_environment() -> None:
    s = FleetSettings.from_env({
        "EDGEFLEET_TELEMETRY_COMMAND": "/usr/bin/notify --channel 'ml alerts'",
        "EDGEFLEET_TELEMETRY_PERSIST_WINDOWS": "5",
        "EDGEFLEET_TELEMETRY_WEBHOOK_URL": "https://hooks.example/drift",
        "EDGEFLEET_METRICS_PUBLIC": "true",
    })
    assert s.telemetry.command == ("/usr/bin/notify", "--channel", "ml alerts")
    assert s.metrics_public and s.telemetry.persist_windows == 5
    cfg = alert_config(s.telemetry)
    assert (cfg.persist_windows, cfg.webhook_url, cfg.command) == (5, "https://hooks.example/drift",
                                                                   s.telemetry.command)
    assert not FleetSettings().metrics_public
    with pytest.raises(ValidationError, match="webhook_url"):
        FleetSettings.from_env({"EDGEFLEET_TELEMETRY_WEBHOOK_URL": "ftp://x"})
    with pytest.raises(ValidationError, match="evaluate_interval_s"):
        TelemetrySettings(evaluate_interval_s=0)
    assert np.isclose(TelemetrySettings().settle_s, 30.0)
