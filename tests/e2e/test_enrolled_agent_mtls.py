"""An agent enrolled with a certificate runs a real update over mutual TLS (issue 18).

Everything is real: Mosquitto from packaging/mosquitto/ with its TLS lines kept (server
certificate for 127.0.0.1 from a test CA, the fleet's device CA and CRL on the mutual-TLS
listener, `tests/support/packaged_broker.py`); the fleet service as `fleet serve` wires it,
logged in as user `fleet` on the loopback listener; `edgefleet agent enroll --identity cert`
making the device's key and sending a CSR; `agent run` as a subprocess connecting with the
issued certificate; a bundle registered and rolled out through the API; the model the agent
then serves checked through its local API. Revocation then keeps the restarted agent out.
"""

from __future__ import annotations

import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from agent.cli.agent_commands import group as agent_group
from agent.config import load_config
from agent.contract.bundle import write_bundle
from agent.daemon.broker_link import BrokerStatus
from fleet.access.auth import create_api_key
from fleet.components import ensure_trust
from fleet.devices.enrollment import write_password_file
from fleet.service import FleetService
from fleet.settings import FleetSettings
from simulators.models import make_mlp_onnx, mlp_reference, mlp_weights
from tests.support.agent_world import Agent, wait_until
from tests.support.broker import free_port
from tests.support.lifecycle_world import FAST, X, manifest_for
from tests.support.packaged_broker import FLEET_PW, BrokerTls, PackagedBroker, start_packaged_broker
from tests.support.service_world import start_fleet_service
from tests.support.tls import ScratchCA, mqtt_tls_probe

pytestmark = pytest.mark.integration


@dataclass
class World:
    root: Path
    settings: FleetSettings
    service: FleetService
    broker: PackagedBroker
    server_ca: ScratchCA
    key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        res = httpx.request(method, self.url + path, json=body, timeout=30,
                            headers={"Authorization": f"Bearer {self.key}"})
        assert res.status_code < 300, f"{method} {path}: {res.status_code} {res.text}"
        return res.json()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    base = FleetSettings(data_dir=tmp_path / "fleet")
    ensure_trust(base)  # the device CA and CRL exist before the broker reads them
    write_password_file(base.broker_passwd_path, [])
    server_ca = ScratchCA.make(tmp_path / "server-ca", "test server CA")
    crt, key = server_ca.server_files(tmp_path / "server-ca")
    ca_dir = base.device_ca_dir
    tls = BrokerTls(crt, key, server_ca.cert_path, ca_dir / "ca.crt", ca_dir / "crl.pem")
    broker = start_packaged_broker(tmp_path / "broker", base.broker_passwd_path, tls)
    settings = FleetSettings.model_validate({
        **base.model_dump(), "port": free_port(),
        "broker_url": f"mqtt://fleet@127.0.0.1:{broker.fleet_port}", "broker_password": FLEET_PW,
        "device_broker_url": f"mqtt://127.0.0.1:{broker.device_port}",
        "device_cert_broker_url": f"mqtts://127.0.0.1:{broker.mtls_port}",
        "broker_pid_file": broker.pid_file, "device_broker_ca_file": server_ca.cert_path})
    model = make_mlp_onnx(1)
    settings.import_dir.mkdir(parents=True)
    write_bundle(manifest_for("1.0.0", model, 1, FAST), model, settings.import_dir / "mlp-1.0.0.efb")
    service = start_fleet_service(settings)
    try:
        w = World(tmp_path, settings, service, broker, server_ca,
                  create_api_key(service.store, "ops", "operator", "test")[1])
        w.api("POST", "/v1/models/mlp/versions/from-bundle", {"path": "mlp-1.0.0.efb"})
        yield w
    finally:
        service.stop()
        broker.proc.terminate()
        broker.proc.wait(timeout=10)


def _enroll(world: World, config: Path) -> str:
    token = world.api("POST", "/v1/enrollment-tokens", {"labels": {"site": "lab"}})["token"]
    sock = Path(tempfile.mkdtemp(prefix="efm-")) / "a.sock"  # AF_UNIX paths are short
    result = CliRunner().invoke(agent_group, [
        "enroll", "--url", world.url, "--token", token, "--identity", "cert", "--config", str(config),
        "--state-dir", str(world.root / "state"), "--unix-socket", str(sock), "--http-port", "0"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "private key (it never left it)" in result.output
    return load_config(config).device_id


def test_an_enrolled_agent_updates_over_mutual_tls_until_it_is_revoked(world: World) -> None:
    config = world.root / "etc" / "agent.json"
    device_id = _enroll(world, config)
    cfg = load_config(config)
    mqtt = cfg.mqtt
    assert (mqtt.tls, mqtt.port, mqtt.username, mqtt.password) == (True, world.broker.mtls_port, None, None)
    assert (mqtt.cert_file, mqtt.key_file) == (config.with_name("device.crt"), config.with_name("device.key"))
    # the broker's server CA came with the enrollment (device_broker_ca_file): no --ca-file needed
    assert mqtt.ca_file == config.with_name("broker-ca.crt")
    assert mqtt.ca_file.read_bytes() == world.server_ca.cert_path.read_bytes()
    for path in (config, mqtt.cert_file, mqtt.key_file, config.with_name("device-ca.crt"), mqtt.ca_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    key_pem = mqtt.key_file.read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key_pem not in (world.settings.db_path.read_bytes())  # the fleet only ever saw the CSR
    assert device_id not in world.settings.broker_passwd_path.read_text()  # no password login exists
    device = world.service.store.devices.get(device_id)
    assert device.identity == "cert" and device.cert_serial

    agent = Agent(device_id, config, cfg.state_dir, cfg.api.unix_socket, None, world.root / "agent.log")
    agent.start()
    try:
        wait_until(lambda: world.service.store.devices.get(device_id).reported_state, 60,
                   f"{device_id} reporting over mutual TLS\n{agent.tail()}")
        rollout = world.api("POST", "/v1/rollouts", {"model_version_id": "mlp:1.0.0", "selector": "site=lab",
                                                     "strategy": {"kind": "all_at_once", "bake_s": 0}})

        def completed() -> bool:
            return bool(world.api("GET", f"/v1/rollouts/{rollout['id']}/status")["state"] == "completed")

        wait_until(completed, 120, f"the rollout completing\n{agent.tail()}")
        expected = mlp_reference(X, mlp_weights(1))
        wait_until(lambda: np.allclose(agent.predict_unix(), expected, atol=1e-4), 30, "serving mlp-1.0.0")
        state = world.service.store.devices.get(device_id).reported_state or {}
        assert state.get("active_bundle") == "mlp-1.0.0"

        # Revoked while it runs: the fleet ends its session, the new CRL keeps it out, and it
        # goes on serving its verified model offline.
        before = agent.log.stat().st_size

        def since_revocation() -> str:
            return agent.log.read_bytes()[before:].decode(errors="replace")

        revoked = world.api("POST", f"/v1/devices/{device_id}/revoke", {"reason": "decommissioned"})
        assert revoked["broker_reloaded"] and revoked["session_ended"], revoked
        wait_until(lambda: "agent.broker_lost" in since_revocation(), 30,
                   f"the session ending\n{agent.tail()}")

        def refused() -> BrokerStatus | None:  # what `agent status` shows
            status = BrokerStatus.read(cfg.state_dir)
            return status if status and "client certificate" in (status.last_error or "") else None

        status = wait_until(refused, 60, f"the agent failing to reconnect\n{agent.tail()}")
        assert status.state == "disconnected" and status.connects == 1, status
        assert "revoked, expired or from another CA" in (status.last_error or "")
        assert "agent.broker_connected" not in since_revocation()
        assert np.allclose(agent.predict_unix(), expected, atol=1e-4)
    finally:
        assert agent.stop() == 0, agent.tail()
    assert mqtt_tls_probe(world.broker.mtls_port or 0, world.server_ca.cert_path, mqtt.cert_file,
                          mqtt.key_file).startswith("tls refused")
