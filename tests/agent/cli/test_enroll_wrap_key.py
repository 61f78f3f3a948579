"""Enrollment makes the device's X25519 wrap key (bundle encryption) on both identity paths.

The private key is 0600 in a 0700 directory of the state directory; the fleet stores exactly
its public half; a malformed `wrap_public_key` is refused before the token is spent.
"""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from agent.cli.agent_commands import group as agent_group
from agent.config import load_config
from agent.contract.envelope import public_key_raw
from agent.trust.wrap_key import load_wrap_key, wrap_key_path
from fleet.devices.wrap_keys import for_devices
from tests.support.broker import free_port
from tests.support.running_fleet import RunningFleet, running_fleet


def _token(fleet: RunningFleet) -> str:
    res = httpx.post(f"{fleet.url}/v1/enrollment-tokens", json={"labels": {"site": "lab"}},
                     headers={"Authorization": f"Bearer {fleet.keys['operator']}"}, timeout=30)
    assert res.status_code == 201, res.text
    return str(res.json()["token"])


def _enroll(fleet: RunningFleet, tmp_path: Path, *extra: str) -> Path:
    config = tmp_path / "etc" / "agent.json"
    result = CliRunner().invoke(agent_group, [
        "enroll", "--url", fleet.url, "--token", _token(fleet), "--config", str(config),
        "--state-dir", str(tmp_path / "state"), "--unix-socket", str(tmp_path / "run" / "a.sock"),
        "--http-port", "0", *extra], env={"EDGEFLEET_ENROLL_TOKEN": ""})
    assert result.exit_code == 0, result.output
    return config


def _check_key(fleet: RunningFleet, tmp_path: Path, config: Path) -> None:
    device_id = load_config(config).device_id
    path = wrap_key_path(tmp_path / "state")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    public = public_key_raw(load_wrap_key(tmp_path / "state").public_key())
    stored = for_devices(fleet.service.store, [device_id])
    assert [(k.device_id, base64.b64decode(k.public_key)) for k in stored] == [(device_id, public)]
    assert b"PRIVATE KEY" not in config.read_bytes()


@pytest.mark.integration
def test_password_enrollment_makes_and_registers_a_wrap_key(tmp_path: Path) -> None:
    with running_fleet(tmp_path / "fleet") as fleet:
        _check_key(fleet, tmp_path, _enroll(fleet, tmp_path))
        # a malformed key is a 422 and the token stays usable
        token = _token(fleet)
        bad = httpx.post(f"{fleet.url}/v1/enroll", json={"wrap_public_key": "bm90IGEga2V5"},
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert bad.status_code == 422 and "wrap_public_key" in bad.text
        good = httpx.post(f"{fleet.url}/v1/enroll", json={},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert good.status_code == 201  # enrolled without a key: it can open no sealed bundle
        assert for_devices(fleet.service.store, [good.json()["device_id"]]) == []


@pytest.mark.integration
def test_certificate_enrollment_makes_and_registers_a_wrap_key(tmp_path: Path) -> None:
    with running_fleet(tmp_path / "fleet", device_cert_broker_url="mqtts://127.0.0.1:18884") as fleet:
        _check_key(fleet, tmp_path, _enroll(fleet, tmp_path, "--identity", "cert"))


@pytest.mark.integration
def test_a_failed_enrollment_leaves_no_wrap_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(agent_group, [
        "enroll", "--url", f"http://127.0.0.1:{free_port()}", "--token", "eft_x", "--timeout", "2",
        "--config", str(tmp_path / "etc" / "agent.json"), "--state-dir", str(tmp_path / "state")],
        env={"EDGEFLEET_ENROLL_TOKEN": ""})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert not wrap_key_path(tmp_path / "state").exists()
