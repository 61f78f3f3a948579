"""Alerts beyond drift on real stores: regressions, devices offline, rollouts stopped by a gate.

A real `TelemetryStore` ingests real encoded reports (two versions in one cohort), a real fleet
`Store` holds the devices and rollouts (the rollout controller of tests/support/rollout_world.py
pauses one on a gate), a real local webhook receives the alerts (failing first, then retried),
and an injected clock decides what is closed and who is offline.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.contract.telemetry_codec import encode_report
from agent.telemetry import TelemetrySketch
from fleet.errors import Conflict
from fleet.registry.profile import compute_reference_profile
from fleet.rollouts.gates import VersionMetrics
from fleet.telemetry.alert_rules import RegressionRule
from fleet.telemetry.alerts import AlertConfig, AlertManager
from fleet.telemetry.health import HealthConfig, HealthWatch
from fleet.telemetry.ingest import IngestConfig, TelemetryStore
from tests.support.fakes import FakeClock
from tests.support.postgres import Backend
from tests.support.rollout_world import V1, V2, World
from tests.support.rollout_world import world as world  # the fixture
from tests.support.telemetry import WebhookRecorder, webhook_server

RNG = np.random.default_rng(5)
REF = RNG.normal(size=(2000, 3))
PROFILE = compute_reference_profile(REF, list("xyz"), outputs=REF.sum(axis=1))
T0 = 1_800_000_000.0  # the FakeClock's start, a multiple of 60
CALLS = 30  # requests per device and window


@pytest.fixture
def webhook() -> Iterator[tuple[str, type[WebhookRecorder]]]:
    with webhook_server("/alerts") as hook:
        yield hook


def _feed(store: TelemetryStore, version: str, cohort: str, windows: range, latency_s: float,
          error_every: int = 0, devices: int = 3, calls: int = CALLS, tag: str = "") -> None:
    """One report per device and window of `calls` requests; every `error_every`-th one fails."""
    for d in range(devices):
        ticks = iter([T0 + 60.0 * k + 1.0 for k in (windows.start - 1, *windows)])
        sk = TelemetrySketch(PROFILE, f"{cohort}-{version}-{tag}{d}", "m", version, cohort=cohort,
                             clock=ticks.__next__, resource_probe=lambda: (50_000_000, 0.1, 0.0))
        for _ in windows:
            for i in range(calls):
                x = RNG.normal(size=(4, 3))
                sk.update(x, x.sum(axis=1), latency_s, error=bool(error_every) and i % error_every == 0)
            assert store.ingest(encode_report(sk.snapshot_and_reset())) == "accepted"


@pytest.mark.integration
def test_regressions_alert_once_per_episode_are_retried_and_acknowledged(
        backend: Backend, webhook: tuple[str, type[WebhookRecorder]]) -> None:
    url, hook = webhook
    clock = FakeClock(T0)
    telemetry = TelemetryStore(backend.location("telemetry.db"), IngestConfig(window_s=60.0),
                               profiles=lambda m, v: PROFILE, clock=clock)
    # eu: 1.0.0 since window 0, 2.0.0 (the candidate) from window 1: 20 % errors and 4x slower
    _feed(telemetry, "1.0.0", "eu", range(0, 5), 0.002)
    _feed(telemetry, "2.0.0", "eu", range(1, 5), 0.008, error_every=5)
    # us: the same bad candidate on a tiny sample (2 devices x 1 window x 10 calls): no verdict
    _feed(telemetry, "1.0.0", "us", range(0, 5), 0.002)
    _feed(telemetry, "2.0.0", "us", range(4, 5), 0.008, error_every=2, devices=2, calls=10)
    hook.status = 503
    alerts = AlertManager(backend.location("alerts.db"), AlertConfig(webhook_url=url, clear_windows=2),
                          clock=clock)
    watch = HealthWatch(telemetry, alerts, None, HealthConfig(window_s=600, settle_s=0,
                                                              rule=RegressionRule(min_requests=200)), clock)
    clock.now = T0 + 6 * 60  # windows 0-4 are closed
    fired = watch.run_once()
    assert sorted((a.kind, a.version, a.cohort, a.baseline) for a in fired) == [
        ("error_rate", "2.0.0", "eu", "1.0.0"), ("latency", "2.0.0", "eu", "1.0.0")]
    err = next(a for a in fired if a.kind == "error_rate")
    assert err.value == pytest.approx(0.2) and err.evidence["candidate_attempts"] == 3 * 4 * CALLS
    assert err.evidence["baseline_failure_rate"] == 0 and err.episode == err.id and err.escalation == 0
    slow = next(a for a in fired if a.kind == "latency")
    assert slow.value == pytest.approx(4.0, rel=0.2) and "p95" in slow.detail
    # the webhook failed: recorded, then retried until it answers
    assert all(not alerts.delivery_state(a.id or 0)[0] and "503" in alerts.delivery_state(a.id or 0)[1]
               for a in fired)
    assert len(hook.received) == 2
    hook.status = 200
    assert alerts.redeliver() == 2 and alerts.redeliver() == 0
    assert {r["kind"] for r in hook.received[2:]} == {"error_rate", "latency"}
    assert hook.received[-1]["baseline"] == "1.0.0" and hook.received[-1]["evidence"]
    # the next cycles see the same regression: the episode goes on, nothing is sent again
    clock.advance(60)
    assert watch.run_once() == []
    # the operator acknowledges once
    before, after = alerts.ack(err.id or 0, "op", "rolled back 2.0.0")
    assert before["acked_at"] is None and after["acked_by"] == "op"
    with pytest.raises(Conflict):
        alerts.ack(err.id or 0, "op")
    # the candidate recovers (its bad windows leave the span): the episodes end after 2 clean cycles
    clock.now = T0 + 31 * 60  # (before ingest: the store clamps report times to its clock)
    _feed(telemetry, "1.0.0", "eu", range(20, 30), 0.002, tag="later-")
    _feed(telemetry, "2.0.0", "eu", range(20, 30), 0.002, tag="later-")
    assert watch.run_once() == [] and len(alerts.open_episodes("error_rate")) == 1
    clock.advance(1)
    assert watch.run_once() == [] and alerts.open_episodes("error_rate") == []
    telemetry.close()
    alerts.close()


@pytest.mark.integration
def test_offline_devices_alert_as_one_episode_that_escalates_and_ends(world: World, backend: Backend) -> None:
    world.enroll("a", "b", "c", "d")
    alerts = AlertManager(backend.location("alerts.db"), AlertConfig(clear_windows=2), clock=world.clock)
    telemetry = TelemetryStore(backend.location("telemetry.db"), clock=world.clock)
    cfg = HealthConfig(offline_after_s=600, gate_alerts=False)
    watch = HealthWatch(telemetry, alerts, world.store, cfg, world.clock)
    assert watch.run_once() == []  # everyone online
    world.store.devices.mark_offline("a")
    world.store.devices.mark_offline("b")
    world.clock.advance(300)
    assert watch.run_once() == []  # offline, but not for long enough
    world.clock.advance(400)
    first = watch.run_once()
    assert [(a.kind, a.subject, a.devices, a.features, a.escalation) for a in first] == [
        ("offline", "devices", ["a", "b"], ["a", "b"], 0)]
    assert first[0].value == pytest.approx(700) and first[0].threshold == 600
    world.store.devices.mark_offline("c")  # last heard 700 s ago too
    more = watch.run_once()
    assert [(a.escalation, a.episode, a.devices) for a in more] == [(1, first[0].id, ["a", "b", "c"])]
    assert more[0].detail.endswith("new: c")
    assert watch.run_once() == []
    # a flaps back and away again: already named in this episode, nothing new
    world.report("a", "idle", V1)
    assert watch.run_once() == []
    world.store.devices.mark_offline("a")
    world.clock.advance(601)
    assert watch.run_once() == []
    # everyone returns: the episode ends after two clean cycles; the next outage is a new episode
    for dev in "abc":
        world.report(dev, "idle", V1)
    assert watch.run_once() == [] and watch.run_once() == []
    assert alerts.open_episodes("offline") == []
    world.store.devices.mark_offline("d")
    world.clock.advance(601)
    again = watch.run_once()
    assert [(a.devices, a.escalation) for a in again] == [(["d"], 0)] and again[0].episode == again[0].id
    assert [a.kind for a in alerts.alerts()] == ["offline"] * 3
    telemetry.close()
    alerts.close()


@pytest.mark.integration
def test_a_rollout_paused_by_a_gate_alerts_once_and_the_episode_ends_on_resume(
        world: World, backend: Backend, tmp_path: Path) -> None:
    world.enroll("a", "b")
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 0},
                        {"min_requests": 100, "max_latency_p95_ratio": 1.2})
    world.metrics[V1] = VersionMetrics(requests=500, errors=1, latency_p95_ms=1.0)
    world.metrics[V2] = VersionMetrics(requests=500, errors=1, latency_p95_ms=3.0)
    # the command parses strict JSON (no NaN: a gate alert has no threshold) and keeps what it got
    out = tmp_path / "gate.json"
    strict = (sys.executable, "-c", "import json, sys; doc = json.loads(sys.stdin.read(), parse_constant="
              f"lambda c: sys.exit(4)); open({str(out)!r}, 'w').write(json.dumps(doc))")
    alerts = AlertManager(backend.location("alerts.db"), AlertConfig(command=strict), clock=world.clock)
    telemetry = TelemetryStore(backend.location("telemetry.db"), clock=world.clock)
    watch = HealthWatch(telemetry, alerts, world.store, HealthConfig(offline_after_s=0), world.clock)
    world.ctl.tick()
    assert watch.run_once() == []  # running: no gate stopped it
    world.commit_all(world.assigned(rid))
    world.ctl.tick()
    assert world.state(rid)[0] == "paused"
    fired = watch.run_once()
    assert [(a.kind, a.subject, a.statistic, a.model, a.version, a.features) for a in fired] == [
        ("rollout_gate", rid, "paused", "mlp", "2.0.0", ["stage 0"])]
    assert "latency p95" in fired[0].detail
    assert alerts.delivery_state(fired[0].id or 0) == (True, "")
    sent = json.loads(out.read_text())
    assert sent["threshold"] is None and sent["kind"] == "rollout_gate" and sent["subject"] == rid
    assert watch.run_once() == []  # still paused: the same episode
    world.store.rollouts.request(rid, "resume", "op")  # acknowledges the breach
    world.metrics[V2] = VersionMetrics(requests=500, errors=1, latency_p95_ms=1.0)
    world.ctl.tick()
    assert world.state(rid)[0] == "running"
    assert watch.run_once() == [] and alerts.open_episodes("rollout_gate") == []
    telemetry.close()
    alerts.close()
