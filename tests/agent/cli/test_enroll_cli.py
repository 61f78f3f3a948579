"""`edgefleet agent enroll` against a real fleet API with real one-time tokens.

The written config must be one `edgefleet agent run` accepts (`parse_config`), private (0600
files in a 0700 directory), on the fleet's topic root; a spent token, an existing config and
an unreachable fleet fail with one line and no traceback. The last test runs the enrolled
agent against a real Mosquitto that knows only the fleet's password file.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
from click.testing import CliRunner, Result

from agent.cli.agent_commands import group as agent_group
from agent.cli.enroll import broker_settings, device_topic_prefix
from agent.config import load_config, parse_config
from agent.contract.protocol import Topics
from agent.daemon.report_signer import ensure_key
from agent.transport import Message
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from tests.support.broker import free_port, spawn_mosquitto, wait_port
from tests.support.running_fleet import RunningFleet, running_fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[RunningFleet]:
    with running_fleet(tmp_path / "fleet", broker_url="mqtt://fleet-svc:s3cret@127.0.0.1:1999") as f:
        yield f


def new_token(fleet: RunningFleet, labels: dict[str, str] | None = None) -> str:
    res = httpx.post(f"{fleet.url}/v1/enrollment-tokens", json={"labels": labels or {}},
                     headers={"Authorization": f"Bearer {fleet.keys['operator']}"}, timeout=30)
    assert res.status_code == 201, res.text
    return str(res.json()["token"])


def enroll(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(agent_group, ["enroll", *args], env={"EDGEFLEET_ENROLL_TOKEN": ""})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    return result


def local_options(tmp_path: Path, config: Path) -> list[str]:
    return ["--config", str(config), "--state-dir", str(tmp_path / "state"),
            "--unix-socket", str(tmp_path / "run" / "agent.sock"), "--http-port", "0"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.integration
def test_enroll_writes_a_private_working_config_and_the_root(fleet: RunningFleet, tmp_path: Path) -> None:
    config = tmp_path / "etc" / "edgefleet" / "agent.json"
    out = enroll("--url", fleet.url, "--token", new_token(fleet, {"site": "lab"}),
                 *local_options(tmp_path, config))
    cfg = parse_config(config.read_text(), str(config))
    assert cfg == load_config(config)
    root = config.with_name("root.json")
    assert (mode(config), mode(root), mode(config.parent)) == (0o600, 0o600, 0o700)
    assert json.loads(root.read_text()) == json.loads(
        (fleet.settings.repo_dir / "metadata" / "1.root.json").read_text())
    assert cfg.bootstrap_root == root and cfg.state_dir == tmp_path / "state"
    assert cfg.labels == {"site": "lab"} and cfg.api.http_port == 0
    # The topic root means what the fleet publishes under: <prefix>/v1/devices/<id>/...
    assert cfg.topic_prefix == fleet.settings.topic_prefix == "edgefleet"
    # Host and port from the fleet's broker URL; its own login (fleet-svc:s3cret) never reaches a device.
    mqtt = cfg.mqtt
    assert (mqtt.host, mqtt.port, mqtt.tls) == ("127.0.0.1", 1999, False)
    assert mqtt.username == mqtt.client_id == cfg.device_id and mqtt.password
    assert "s3cret" not in config.read_text() and "fleet-svc" not in config.read_text()
    assert mqtt.password not in out.output
    assert f"enrolled as {cfg.device_id}" in out.stdout and f"wrote {config}" in out.stdout
    assert f"wrote {root}" in out.stdout
    device = fleet.service.store.devices.get(cfg.device_id)
    assert device.labels == {"site": "lab"} and device.agent_version
    # The report signing key: made here, 0600 in the state dir; only its public half reached the fleet.
    report_key = cfg.state_dir / "report.key"
    assert mode(report_key) == 0o600 and b"PRIVATE KEY" in report_key.read_bytes()
    assert fleet.service.store.report_keys.key_of(cfg.device_id) == ensure_key(cfg.state_dir)[0]
    # The fleet's answer itself: the topic root (not the device's subtree), a URL without the fleet's login.
    raw = httpx.post(f"{fleet.url}/v1/enroll", json={},
                     headers={"Authorization": f"Bearer {new_token(fleet)}"}, timeout=30).json()["broker"]
    assert (raw["url"], raw["topic_prefix"]) == ("mqtt://127.0.0.1:1999", "edgefleet")


@pytest.mark.integration
def test_a_used_token_fails_with_a_clear_message(fleet: RunningFleet, tmp_path: Path) -> None:
    token = new_token(fleet)
    first = tmp_path / "a" / "agent.json"
    enroll("--url", fleet.url, "--token", token, *local_options(tmp_path, first))
    before = first.read_bytes()
    again = enroll("--url", fleet.url, "--token", token, *local_options(tmp_path, first), "--force", code=1)
    assert again.stderr.startswith("Error: the fleet refused the enrollment token: invalid, used or expired")
    assert len(again.stderr.strip().splitlines()) == 1
    assert first.read_bytes() == before  # nothing was overwritten


@pytest.mark.integration
def test_an_existing_config_is_kept_and_the_token_not_spent(fleet: RunningFleet, tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    config.write_text("{}")
    token = new_token(fleet)
    refused = enroll("--url", fleet.url, "--token", token, *local_options(tmp_path, config), code=1)
    assert "exists (use --force" in refused.stderr and config.read_text() == "{}"
    forced = enroll("--url", fleet.url, "--token", token, *local_options(tmp_path, config), "--force",
                    "--json")
    summary = json.loads(forced.stdout)
    assert summary["config"] == str(config) and "password" not in forced.stdout
    assert parse_config(config.read_text()).device_id == summary["device_id"]
    assert mode(config) == 0o600


@pytest.mark.integration
def test_unreachable_fleet_and_bad_options_are_one_line(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "agent.json"
    gone = enroll("--url", down, "--token", "eft_x", *local_options(tmp_path, config), code=1)
    assert gone.stderr.startswith(f"Error: cannot reach the fleet at {down}") and not config.exists()
    bad = enroll("--url", "ftp://fleet", "--token", "eft_x", "--config", str(config), code=2)
    assert "http(s)" in bad.stderr
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "enroll", "--url", down,
                           "--token", "eft_x", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "cannot reach" in proc.stderr


@pytest.mark.unit
def test_broker_url_and_topic_prefix_mapping() -> None:
    assert broker_settings("mqtts://user:pw@broker.example") == {"host": "broker.example", "port": 8883,
                                                                 "tls": True}
    assert broker_settings("mqtt://[::1]:1884")["host"] == "::1"
    for bad in ("http://x", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(click.ClickException):
            broker_settings(bad)
    # A fleet from before the fix answered the device's subtree: the agent still gets the root.
    assert device_topic_prefix("edgefleet/v1/devices/dev-1", "dev-1") == "edgefleet"
    assert device_topic_prefix("edgefleet", "dev-1") == "edgefleet"


@pytest.mark.integration
def test_an_enrolled_agent_connects_with_its_credentials_on_the_fleet_topics(tmp_path: Path) -> None:
    port = free_port()
    with running_fleet(tmp_path / "fleet", broker_url=f"mqtt://127.0.0.1:{port}") as fleet:
        config = tmp_path / "etc" / "agent.json"
        enroll("--url", fleet.url, "--token", new_token(fleet), *local_options(tmp_path, config))
        passwd = fleet.settings.broker_passwd_path
    device_id = load_config(config).device_id
    # A broker that knows the fleet's password file; anonymous clients (the watcher) may only watch.
    conf = tmp_path / "mosquitto.conf"
    stay = "user root\n" if os.geteuid() == 0 else ""  # root would drop to "mosquitto", locked out of tmp
    conf.write_text(f"{stay}listener {port} 127.0.0.1\nallow_anonymous true\npassword_file {passwd}\n"
                    "persistence false\nlog_type error\nlog_type warning\n")
    broker = spawn_mosquitto(conf, tmp_path / "mosquitto.log")
    agent: subprocess.Popen[str] | None = None
    watcher = MqttTransport(MqttConfig(port=port, client_id=f"watch-{os.getpid()}"))
    seen = threading.Event()

    def on_report(message: Message) -> None:
        seen.set()  # subscribed before the agent starts: its first retained report

    try:
        wait_port("127.0.0.1", port)
        watcher.subscribe(Topics("edgefleet").reported(device_id), on_report)
        watcher.connect(10)
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "run", "--config", str(config)],
                                 text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not seen.is_set() and time.monotonic() < deadline and agent.poll() is None:
            seen.wait(0.1)
        assert seen.is_set(), "the enrolled agent never reported on edgefleet/v1/devices/<id>/reported"
    finally:
        watcher.close()
        if agent is not None:
            agent.terminate()
            log = agent.communicate(timeout=30)[0]
            assert agent.returncode == 0 and "Traceback" not in log, log[-3000:]
        broker.terminate()
        broker.wait(timeout=10)


@pytest.mark.integration
def test_enroll_with_a_certificate_writes_a_private_key_and_no_password(tmp_path: Path) -> None:
    with running_fleet(tmp_path / "fleet", device_cert_broker_url="mqtts://127.0.0.1:18884") as fleet:
        config = tmp_path / "etc" / "agent.json"
        out = enroll("--url", fleet.url, "--token", new_token(fleet, {"site": "lab"}), "--identity", "cert",
                     *local_options(tmp_path, config))
        cfg = load_config(config)
        device = fleet.service.store.devices.get(cfg.device_id)
        assert device.identity == "cert"
        assert fleet.service.store.report_keys.key_of(cfg.device_id) == ensure_key(cfg.state_dir)[0]
    mqtt = cfg.mqtt
    assert (mqtt.host, mqtt.port, mqtt.tls) == ("127.0.0.1", 18884, True)
    assert (mqtt.username, mqtt.password) == (None, None)  # the broker takes the username from the CN
    files = [config.with_name(n) for n in ("device.key", "device.crt", "device-ca.crt")]
    assert [mqtt.key_file, mqtt.cert_file] == files[:2]
    assert all(mode(f) == 0o600 for f in [config, *files]) and mode(config.parent) == 0o700
    assert f"as certificate {files[1]}" in out.stdout and "password" not in config.read_text().replace(
        '"password": null', "")
    # an existing key is not overwritten without --force, and the token is not spent
    assert "did not reload the broker" not in out.output  # a certificate needs no password-file reload
    with running_fleet(tmp_path / "fleet2") as fleet:  # no mutual-TLS listener configured
        config.unlink()
        config.with_name("root.json").unlink()
        token = new_token(fleet)
        kept = enroll("--url", fleet.url, "--token", token, "--identity", "cert",
                      *local_options(tmp_path, config), code=1)
        assert f"{files[0]} exists" in kept.stderr
        # a fleet without a mutual-TLS listener says so, in one line
        no_tls = enroll("--url", fleet.url, "--token", token, "--identity", "cert", "--force",
                        *local_options(tmp_path, tmp_path / "other" / "agent.json"), code=1)
    assert "(503): certificate enrollment needs the broker's mutual-TLS listener" in no_tls.stderr
    assert len(no_tls.stderr.strip().splitlines()) == 1
