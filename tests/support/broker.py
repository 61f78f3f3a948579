"""A private Mosquitto broker on a free port, for fixtures and tests that need their own.

Tests never use a broker that happens to run on 1883: they get their own, so they can
restart it, read its logs and measure it without touching anything else.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """A running Mosquitto owned by the test session."""

    host: str
    port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port (for reconnect and resume tests)."""
        self.stop()
        self.proc = spawn_mosquitto(self.conf, self.log)
        wait_port(self.host, self.port)


def spawn_mosquitto(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise RuntimeError("mosquitto is not installed: run `bash .ci/setup` (apt-get install mosquitto)")
    out = log.open("ab")
    return subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on {host}:{port} within {timeout}s")


def start_mosquitto(workdir: Path, extra_conf: str = "", allow_anonymous: bool = True) -> Broker:
    """Start a Mosquitto with a generated config in `workdir`; the caller stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "mosquitto.conf"
    log = workdir / "mosquitto.log"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
        "persistence false\n"
        "max_queued_messages 10000\n"
        "message_size_limit 0\n"
        "log_type error\nlog_type warning\n" + extra_conf
    )
    proc = spawn_mosquitto(conf, log)
    wait_port("127.0.0.1", port)
    return Broker("127.0.0.1", port, conf, log, proc)
