"""An enrolled device gets its own broker login only, never the fleet's (issue 20, defect 1).

A real Mosquitto runs from the packaged config and ACL (`tests/support/packaged_broker.py`): the
device listener checks the password file the fleet writes at enrollment, the fleet listener
its own file with user `fleet`. Enrollment goes through the API (FastAPI TestClient) and the
reload hook SIGHUPs the broker through its pid file, as in production.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from agent.transport.mqtt_client import MqttTransport
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.components import broker_config
from fleet.devices.enrollment import sync_broker_credentials
from fleet.settings import FleetSettings
from fleet.store import Store
from tests.support.packaged_broker import FLEET_PW, DeviceClient, PackagedBroker, start_packaged_broker

PREFIX = "edgefleet"


@dataclass
class World:
    store: Store
    base: FleetSettings
    broker: PackagedBroker
    operator: str

    def enroll(self, settings: FleetSettings) -> tuple[dict[str, Any], str]:
        """Enroll one device through an app built with `settings`; (response body, raw text)."""
        with TestClient(create_app(settings, self.store), raise_server_exceptions=False) as client:
            tok = client.post("/v1/enrollment-tokens", json={"labels": {"env": "prod"}},
                              headers={"Authorization": f"Bearer {self.operator}"})
            res = client.post("/v1/enroll", json={"agent_version": "1.0.0"},
                              headers={"Authorization": f"Bearer {tok.json()['token']}"})
        assert res.status_code == 201, res.text
        assert res.headers["Edgefleet-Broker-Reloaded"] == "true"
        return res.json(), res.text


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    store = Store(tmp_path / "data" / "fleet.db")
    base = FleetSettings(data_dir=tmp_path / "data")
    sync_broker_credentials(store, base.broker_passwd_path)  # the broker needs the file at start
    broker = start_packaged_broker(tmp_path / "broker", base.broker_passwd_path)
    operator = create_api_key(store, "op", "operator", "test")[1]
    try:
        yield World(store, base.model_copy(update={"broker_pid_file": broker.pid_file}), broker, operator)
    finally:
        broker.proc.terminate()
        broker.proc.wait(timeout=10)
        store.close()


def _wait_for(device: DeviceClient, topic: str, payload: bytes) -> None:
    for _ in range(100):
        if (topic, payload) in device.messages:
            return
        device.got.wait(0.1)
        device.got.clear()
    raise AssertionError(f"{payload!r} on {topic} never arrived: {device.messages}")


def _only_own_credentials(body: dict[str, Any], text: str) -> None:
    broker = body["broker"]
    parts = urlsplit(broker["url"])
    assert parts.username is None and parts.password is None and "@" not in parts.netloc
    assert broker["username"] == broker["client_id"] == body["device_id"]
    assert FLEET_PW not in text and "fleet@" not in text and "fleet:" not in text
    assert set(broker) == {"url", "username", "password", "ca_pem", "client_id", "topic_prefix"}
    assert broker["ca_pem"] is None  # no device_broker_ca_file configured


@pytest.mark.integration
def test_without_a_device_url_devices_get_the_fleet_url_minus_its_login(world: World) -> None:
    fleet_url = f"mqtt://fleet:{FLEET_PW}@127.0.0.1:{world.broker.fleet_port}"
    body, text = world.enroll(world.base.model_copy(update={"broker_url": fleet_url}))
    _only_own_credentials(body, text)
    assert body["broker"]["url"] == f"mqtt://127.0.0.1:{world.broker.fleet_port}"
    # ... which is the fleet's listener: the device's own login does not work there.
    on_fleet_listener = DeviceClient(world.broker.fleet_port, body["device_id"], body["broker"]["password"])
    try:
        assert on_fleet_listener.first_connack().is_failure
    finally:
        on_fleet_listener.close()


@pytest.mark.integration
def test_devices_get_the_device_listener_and_the_fleet_user_is_not_reachable_there(world: World) -> None:
    settings = FleetSettings.model_validate({
        **world.base.model_dump(), "broker_url": f"mqtt://fleet@127.0.0.1:{world.broker.fleet_port}",
        "broker_password": FLEET_PW, "device_broker_url": f"mqtt://127.0.0.1:{world.broker.device_port}"})
    assert isinstance(settings.broker_password, SecretStr) and FLEET_PW not in repr(settings)
    body, text = world.enroll(settings)
    other, _ = world.enroll(settings)
    _only_own_credentials(body, text)
    url = urlsplit(body["broker"]["url"])
    assert (url.hostname, url.port) == ("127.0.0.1", world.broker.device_port)

    # The fleet connects with the password from the settings, not from its URL.
    fleet = MqttTransport(broker_config(settings.broker_url, "fleet-enroll-test",
                                        settings.broker_password.get_secret_value()))
    fleet.connect(timeout=10)
    device = DeviceClient(url.port, body["device_id"], body["broker"]["password"])
    fleet_on_device_listener = DeviceClient(url.port, "fleet", FLEET_PW)
    try:
        assert not device.first_connack().is_failure  # its own login, on the listener it was told
        assert fleet_on_device_listener.first_connack().is_failure  # the fleet's user does not exist there
        own = f"{PREFIX}/v1/devices/{body['device_id']}/desired"
        foreign = f"{PREFIX}/v1/devices/{other['device_id']}/reported"
        fleet.publish(foreign, json.dumps({"state": "committed"}).encode(), retain=True).wait_for_publish(10)
        fleet.publish(own, b"signed director document", retain=True).wait_for_publish(10)
        device.client.subscribe("#", qos=1)  # what an intruder with a device login tries first
        _wait_for(device, own, b"signed director document")  # subscribed: now live traffic too
        fleet.publish(foreign, b"live report").wait_for_publish(10)
        fleet.publish(own, b"end", retain=False).wait_for_publish(10)
        _wait_for(device, own, b"end")
        assert {t for t, _ in device.messages} == {own}  # nothing of the other device, even on '#'
    finally:
        for topic in (f"{PREFIX}/v1/devices/{body['device_id']}/desired",
                      f"{PREFIX}/v1/devices/{other['device_id']}/reported"):
            fleet.publish(topic, b"", retain=True).wait_for_publish(10)
        for client in (device, fleet_on_device_listener):
            client.close()
        fleet.close()
