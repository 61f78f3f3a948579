"""`edgefleet fleet serve` on a user's mistake: one line, a non-zero exit, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.broker import free_port

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "serve", "--data-dir",
                           str(tmp_path / "data"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_busy_port_fails_before_anything_is_created(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = _serve(tmp_path, "--port", str(port))
    assert out.returncode == 1
    assert f"Error: cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "data").exists()  # no keys, no database: the port was tried first


def test_an_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    out = _serve(tmp_path, "--port", str(free_port()), "--broker", "mqtt://127.0.0.1:1")
    assert out.returncode == 1
    assert "Error: publisher cannot reach the broker" in out.stderr
    assert "Connection refused" in out.stderr  # why, not only that it gave up
    assert "publisher.connecting" in out.stderr  # said at once, before the wait
    assert "Traceback" not in out.stderr + out.stdout
