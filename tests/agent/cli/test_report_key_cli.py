"""`edgefleet agent report-key`: makes the key once (0600), prints the public half to register."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli.report_key import report_key_command
from agent.daemon.report_signer import ensure_key


def _config(tmp_path: Path) -> Path:
    root = tmp_path / "root.json"
    root.write_text("{}")
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"device_id": "dev-old", "state_dir": str(tmp_path / "state"),
                                "bootstrap_root": str(root), "topic_prefix": "edgefleet",
                                "mqtt": {"host": "127.0.0.1", "port": 1883}}))
    return path


@pytest.mark.integration
def test_report_key_is_made_once_and_printed_for_the_operator(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first = CliRunner().invoke(report_key_command, ["--config", str(config)])
    assert first.exit_code == 0, first.output
    key_file = tmp_path / "state" / "report.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = base64.b64encode(ensure_key(tmp_path / "state")[0]).decode()
    assert f"edgefleet devices set-report-key dev-old {public}" in first.output and "made" in first.output
    again = CliRunner().invoke(report_key_command, ["--config", str(config), "--json"])
    doc = json.loads(again.output)
    assert (doc["public_key"], doc["made"], doc["device_id"]) == (public, False, "dev-old")


@pytest.mark.integration
def test_a_broken_key_file_is_one_line(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "report.key").write_text("garbage")
    out = CliRunner().invoke(report_key_command, ["--config", str(config)])
    assert out.exit_code == 1 and "is not a PEM private key" in out.output and "Traceback" not in out.output
