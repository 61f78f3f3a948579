"""`edgefleet fleet serve`: broker credentials on the command line are warned about, bad
settings are a one-line error (no traceback, no password echoed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.cli.fleet import group


@pytest.mark.unit
def test_serve_refuses_a_device_url_with_credentials_and_warns_about_a_password_in_argv(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgefleet.fleet.cli")
    out = CliRunner().invoke(group, ["serve", "--data-dir", str(tmp_path), "--broker",
                                     "mqtt://fleet:hunter2@127.0.0.1:1884",
                                     "--device-broker", "mqtts://dev:devpw@broker:8883"])
    assert out.exit_code == 1, out.output
    assert "device_broker_url" in out.output and "must not carry credentials" in out.output
    assert "Traceback" not in out.output and "hunter2" not in out.output and "devpw" not in out.output
    warned = [r for r in caplog.records if r.getMessage() == "fleet.broker_password_on_command_line"]
    assert len(warned) == 1 and "EDGEFLEET_BROKER_PASSWORD" in warned[0].__dict__["hint"]
    assert "hunter2" not in caplog.text
