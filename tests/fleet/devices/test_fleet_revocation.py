"""Device revocation takes effect at the broker and in the fleet.

A real Mosquitto runs from the packaged config (`packaging/mosquitto/`, TLS lines dropped,
per-listener settings kept) with the device listener's `password_file` pointing at the file
the fleet writes. Devices are enrolled and revoked through the API (FastAPI TestClient);
the reload hook SIGHUPs that broker through a pid file. The rollout part runs the real
controller over the real store with an injected clock (`test_rollouts_controller.World`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.contract.protocol import ReportedState
from agent.transport.mqtt_config import MqttConfig
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.api.deps import ApiCollaborators
from fleet.delivery.publisher import Publisher
from fleet.devices.broker_reload import IMPACT, NOT_CONFIGURED, reload_broker
from fleet.devices.enrollment import mosquitto_password_hash, sync_broker_credentials
from fleet.devices.revocation import RevokedFilter
from fleet.rollouts.records import RolloutRecords
from fleet.settings import FleetSettings
from fleet.store import Store
from tests.support.fakes import FakeClock
from tests.support.packaged_broker import FLEET_PW, DeviceClient, PackagedBroker, start_packaged_broker
from tests.support.postgres import Backend
from tests.support.rollout_world import V1, V2, World
from tests.support.rollout_world import world as world  # the fixture, re-used

PREFIX = "edgefleet"


@dataclass
class Fleet:
    client: TestClient
    store: Store
    settings: FleetSettings
    broker: PackagedBroker
    publisher: Publisher
    operator: str

    def enroll(self) -> tuple[dict[str, Any], str]:
        h = {"Authorization": f"Bearer {self.operator}"}
        tok = self.client.post("/v1/enrollment-tokens", json={"labels": {"env": "prod"}}, headers=h)
        res = self.client.post("/v1/enroll", json={"agent_version": "1.0.0"},
                               headers={"Authorization": f"Bearer {tok.json()['token']}"})
        assert res.status_code == 201, res.text
        return res.json(), res.headers["Edgefleet-Broker-Reloaded"]

    def revoke(self, device_id: str) -> dict[str, Any]:
        res = self.client.post(f"/v1/devices/{device_id}/revoke", json={"reason": "stolen"},
                               headers={"Authorization": f"Bearer {self.operator}"})
        assert res.status_code == 200, res.text
        return dict(res.json())


@pytest.fixture
def fleet(tmp_path: Path, backend: Backend) -> Iterator[Fleet]:
    base = FleetSettings(data_dir=tmp_path / "data", database_url=backend.pg_url)
    store = Store(base.database if backend.pg_url else tmp_path / "data" / "fleet.db", clock=FakeClock())
    sync_broker_credentials(store, base.broker_passwd_path)  # the broker needs the file at start
    broker = start_packaged_broker(tmp_path / "broker", base.broker_passwd_path)
    settings = base.model_copy(update={"broker_pid_file": broker.pid_file})
    operator = create_api_key(store, "op", "operator", "test")[1]
    publisher = Publisher(MqttConfig(port=broker.fleet_port, client_id="fleet-test", username="fleet",
                                     password=FLEET_PW, clean_start=True), PREFIX,  # type: ignore[arg-type]
                          settings.repo_dir)
    publisher.start()
    app = create_app(settings, store, collaborators=ApiCollaborators(publisher=publisher))
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Fleet(client, store, settings, broker, publisher, operator)
    finally:
        publisher.stop()
        broker.proc.terminate()
        broker.proc.wait(timeout=10)
        store.close()


def _fleet_sees_retained(fleet: Fleet, topic: str) -> list[bytes]:
    """Retained payloads on `topic`, read as the fleet user; a retained sentinel marks the end."""
    sentinel = f"{PREFIX}/v1/test/sentinel"
    sub = DeviceClient(fleet.broker.fleet_port, "fleet", FLEET_PW)
    try:
        assert not sub.first_connack().is_failure
        sub.client.publish(sentinel, b"end", qos=1, retain=True).wait_for_publish(10)
        sub.client.subscribe(topic, qos=1)
        sub.client.subscribe(sentinel, qos=1)  # Mosquitto answers subscriptions in order
        for _ in range(100):
            if any(t == sentinel for t, _ in sub.messages):
                break
            sub.got.wait(0.1)
            sub.got.clear()
        assert any(t == sentinel for t, _ in sub.messages), "sentinel never arrived"
        return [p for t, p in sub.messages if t == topic]
    finally:
        sub.close()


@pytest.mark.integration
def test_revocation_cuts_the_session_refuses_reconnects_and_clears_desired(fleet: Fleet) -> None:
    enrolled, reloaded = fleet.enroll()
    other, _ = fleet.enroll()
    assert reloaded == "true"  # the new login was applied by SIGHUP through the pid file
    dev, pw = enrolled["device_id"], enrolled["broker"]["password"]
    desired = f"{PREFIX}/v1/devices/{dev}/desired"
    fleet.publisher.publish_desired(device_id=dev, document=b"signed director document")
    assert _fleet_sees_retained(fleet, desired) == [b"signed director document"]

    device = DeviceClient(fleet.broker.device_port, dev, pw)
    bystander = DeviceClient(fleet.broker.device_port, other["device_id"], other["broker"]["password"])
    try:
        assert not device.first_connack().is_failure and not bystander.first_connack().is_failure
        device.client.reconnect_delay_set(60, 60)  # after the kick, reconnect only when the test says so

        out = fleet.revoke(dev)
        assert out["revoked"] is True
        assert out["broker_reloaded"] is True and "SIGHUP" in out["broker_detail"]
        assert out["desired_cleared"] is True and desired in out["desired_detail"]
        # Mosquitto 2.0 re-checks connected clients against the reloaded password file.
        assert device.disconnected.wait(10), "the revoked device's open session survived the reload"
        assert not bystander.disconnected.is_set()
        assert dev not in fleet.settings.broker_passwd_path.read_text()
    finally:
        device.close()
        bystander.close()

    again = DeviceClient(fleet.broker.device_port, dev, pw)
    try:
        code = again.first_connack()
        assert code.is_failure and code.getName() == "Not authorized"
    finally:
        again.close()
    assert _fleet_sees_retained(fleet, desired) == []  # the empty retained payload removed it


@pytest.mark.integration
def test_revoke_reports_a_broker_that_was_not_reloaded(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db", clock=FakeClock())
    settings = FleetSettings(data_dir=tmp_path, broker_pid_file=tmp_path / "missing.pid")
    operator = create_api_key(store, "op", "operator", "test")[1]
    store.devices.create("dev-1", {}, {}, "dev-1", mosquitto_password_hash("x"), "test")
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        res = client.post("/v1/devices/dev-1/revoke", json={},
                          headers={"Authorization": f"Bearer {operator}"})
    store.close()
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["revoked"] is True and body["broker_reloaded"] is False
    assert "cannot read pid file" in body["broker_detail"]
    assert body["desired_cleared"] is False and "no publisher" in body["desired_detail"]
    assert settings.broker_passwd_path.read_text() == ""  # the store's decision still reached the file


@pytest.mark.integration
@pytest.mark.parametrize(("hook", "expected"), [
    ({}, NOT_CONFIGURED),
    ({"broker_reload_command": ("false",)}, "reload command exited with 1"),
    ({"broker_reload_command": ("/nonexistent/reload",)}, "reload command not found"),
    ({"broker_reload_command": ("sleep", "5"), "broker_reload_timeout_s": 0.2}, "did not finish within 0.2s"),
    ({"broker_pid_file": "PIDFILE:not-a-pid"}, "does not hold a process id"),
    ({"broker_pid_file": "PIDFILE:2147483646"}, "stale"),
])
def test_reload_failures_are_reported_not_raised(tmp_path: Path, hook: dict[str, Any], expected: str) -> None:
    if str(hook.get("broker_pid_file", "")).startswith("PIDFILE:"):
        pid_file = tmp_path / "broker.pid"
        pid_file.write_text(str(hook["broker_pid_file"]).split(":", 1)[1])
        hook = {**hook, "broker_pid_file": pid_file}
    result = reload_broker(FleetSettings(data_dir=tmp_path, **hook))
    assert result.reloaded is False and expected in result.detail


@pytest.mark.integration
def test_reload_command_runs_and_both_hooks_must_succeed(tmp_path: Path) -> None:
    marker = tmp_path / "reloaded"
    ok = reload_broker(FleetSettings(data_dir=tmp_path, broker_reload_command=("touch", str(marker))))
    assert ok.reloaded is True and marker.exists()
    both = reload_broker(FleetSettings(data_dir=tmp_path, broker_reload_command=("true",),
                                       broker_pid_file=tmp_path / "absent.pid"))
    assert both.reloaded is False and "ran true" in both.detail and "absent.pid" in both.detail


@pytest.mark.integration
def test_reload_warning_is_quiet_without_a_password_file_and_says_what_it_means_with_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def reload_records(settings: FleetSettings) -> list[logging.LogRecord]:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="edgefleet.fleet.broker"):
            assert reload_broker(settings).reloaded is False
        return [r for r in caplog.records if r.getMessage() == "fleet.broker.reload_failed"]

    quiet = reload_records(FleetSettings(data_dir=tmp_path))  # no password: the broker is anonymous
    assert [r.levelno for r in quiet] == [logging.DEBUG]
    secret = tmp_path / "fleet.pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    with_file = FleetSettings(data_dir=tmp_path, broker_url="mqtt://fleet@127.0.0.1:1884",
                              broker_password_file=secret)
    loud = reload_records(with_file)
    assert [r.levelno for r in loud] == [logging.WARNING]
    assert loud[0].__dict__["impact"] == IMPACT
    assert "devices enrolled since the last broker restart cannot connect until Mosquitto reloads its " \
           "password file" in IMPACT
    failing_hook = reload_records(FleetSettings(data_dir=tmp_path, broker_reload_command=("false",)))
    assert [r.levelno for r in failing_hook] == [logging.WARNING]  # a configured hook that fails is news


@pytest.mark.unit
def test_reload_hooks_come_from_the_environment() -> None:
    s = FleetSettings.from_env({"EDGEFLEET_BROKER_RELOAD_COMMAND": "systemctl reload 'mosquitto'",
                                "EDGEFLEET_BROKER_PID_FILE": "/run/mosquitto/mosquitto.pid",
                                "EDGEFLEET_BROKER_RELOAD_TIMEOUT_S": "3"})
    assert s.broker_reload_command == ("systemctl", "reload", "mosquitto")
    assert s.broker_pid_file == Path("/run/mosquitto/mosquitto.pid") and s.broker_reload_timeout_s == 3
    assert FleetSettings.from_env({"EDGEFLEET_BROKER_RELOAD_COMMAND": ""}).broker_reload_command is None
    with pytest.raises(ValueError, match="broker_reload_timeout_s"):
        FleetSettings.from_env({"EDGEFLEET_BROKER_RELOAD_TIMEOUT_S": "0"})


# -- fleet side: rollouts, reports, telemetry ----------------------------------------------------
@pytest.mark.integration
def test_a_device_revoked_before_the_rollout_is_not_in_its_cohort(world: World) -> None:
    world.enroll("a", "b", "c")
    world.store.devices.revoke("b", "op")
    rid = world.rollout({"kind": "all_at_once", "bake_s": 0})
    world.ctl.tick()
    assert world.assigned(rid) == ["a", "c"] and "b" not in world.devices(rid)
    assert "b" not in world.pub.docs
    world.commit_all(["a", "c"])
    world.ctl.tick()
    assert world.state(rid)[0] == "completed"


@pytest.mark.integration
def test_a_device_revoked_mid_rollout_gets_no_more_documents(world: World) -> None:
    devs = [f"d{i}" for i in range(4)]
    world.enroll(*devs)
    rid = world.rollout({"kind": "canary", "stages": [25, 100], "bake_s": 0})
    world.ctl.tick()
    first = world.assigned(rid)
    assert len(first) == 1
    pending = [d for d in devs if d not in first]
    world.store.devices.revoke(first[0], "op")     # assigned, not committed
    world.store.devices.revoke(pending[0], "op")   # still pending
    world.ctl.tick()
    rows = {r.device_id: r for r in RolloutRecords(world.store).progress(rid)}
    assert rows[first[0]].outcome == "skipped" and rows[first[0]].detail == "device revoked"
    assert pending[0] not in rows  # left the cohort before any document reached it
    for _ in range(3):
        world.ctl.tick()
    world.commit_all(pending[1:])
    world.ctl.tick()
    world.ctl.tick()
    assert world.state(rid)[0] == "completed"
    assert pending[0] not in world.pub.docs and len(world.pub.docs[first[0]]) == 1
    # the revoked device's report is refused and counted, not folded into the rollout
    before = world.store.devices.refused_reports
    world.store.devices.on_reported(first[0], ReportedState(state="idle", active_bundle=V2,
                                                            timestamp=world.clock.now))
    assert world.store.devices.refused_reports == before + 1
    assert (world.store.devices.get(first[0]).reported_state or {}).get("active_bundle") == V1


@pytest.mark.integration
def test_a_rollback_sends_no_revert_document_to_a_revoked_device(world: World) -> None:
    world.enroll("a", "b")
    rid = world.rollout({"kind": "all_at_once", "bake_s": 3600})
    world.ctl.tick()
    world.commit_all(["a", "b"])
    world.ctl.tick()
    world.store.devices.revoke("b", "op")
    RolloutRecords(world.store).command(rid, "rollback", "op", "regret")
    for _ in range(3):
        world.ctl.tick()
    assert world.pub.last_target("a") == V1 and world.pub.last_target("b") == V2  # b got no revert
    rows = {r.device_id: r for r in RolloutRecords(world.store).progress(rid)}
    assert rows["b"].outcome == "skipped" and rows["b"].detail == "device revoked"


@pytest.mark.integration
def test_telemetry_and_events_of_revoked_devices_are_dropped_and_counted(world: World) -> None:
    world.enroll("a", "b")
    world.store.devices.revoke("b", "op")
    seen: list[tuple[str, bytes]] = []
    guard = RevokedFilter[bytes](world.store, lambda dev, payload: seen.append((dev, payload)), "telemetry")
    guard("a", b"sketch-a")
    guard("b", b"sketch-b")
    guard("b", b"sketch-b2")
    guard("never-enrolled", b"x")  # unknown ids pass: the broker ACL already confines them
    assert seen == [("a", b"sketch-a"), ("never-enrolled", b"x")] and guard.refused == 2


@pytest.mark.integration
def test_the_filter_sees_a_revocation_within_its_refresh_period(world: World) -> None:
    world.enroll("a")
    now = [0.0]
    seen: list[str] = []
    guard = RevokedFilter[bytes](world.store, lambda dev, payload: seen.append(dev), "telemetry",
                                 refresh_s=1.0, clock=lambda: now[0])
    guard("a", b"1")
    world.store.devices.revoke("a", "op")
    now[0] = 0.5
    guard("a", b"2")  # the cached set is half a second old: still passes
    now[0] = 1.0
    guard("a", b"3")  # re-read: refused
    assert seen == ["a", "a"] and guard.refused == 1
