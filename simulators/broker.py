"""A broker for the demo and the scenarios when none is given: a managed Mosquitto.

Why these settings: MQTT v5 is Mosquitto's default per client; `message_size_limit` must stay
above the chunk size plus headers (a 64 KiB chunk must pass), and `max_queued_messages`
is raised because Mosquitto's default of 1000 silently drops QoS 1 messages past it while a
swarm catches up. Persistence is on (in the broker's own directory) so that a restart in the
middle of a transfer keeps sessions and retained messages, as a production broker would.

The embedded `iotcore` broker (rumqttd) is not used: it is not installed here and Mosquitto
is the reference; `start_broker` says so when Mosquitto is missing.

Errors: `start_broker` raises `fleet.errors.FleetMisuseError` when no broker can be started
and `FleetTransportError` when it does not accept an MQTT CONNECT in time.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fleet.errors import FleetMisuseError, FleetTransportError

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


@dataclass(frozen=True)
class BrokerSettings:
    """Limits written into the generated configuration."""

    message_size_limit: int = 1024 * 1024  # bytes; above the largest chunk + headers
    max_queued_messages: int = 100_000
    max_inflight_messages: int = 64
    persistence: bool = True
    ready_timeout_s: float = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).exists()), None)


def mqtt_ready(host: str, port: int, timeout: float) -> bool:
    """True once the broker answers a real MQTT v5 CONNECT with a CONNACK (not just a TCP accept)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="edgefleet-ready-probe", protocol=paho.MQTTv5
        )
        try:
            client.connect(host, port, keepalive=10)
            end = min(deadline, time.monotonic() + 1.0)
            while time.monotonic() < end:
                client.loop(timeout=0.05)
                if client.is_connected():
                    client.disconnect()
                    return True
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError, ValueError):
                client.disconnect()
                client.loop(timeout=0.01)
        time.sleep(0.05)
    return False


class ManagedBroker:
    """A Mosquitto child process on a fixed port with a generated configuration."""

    def __init__(
        self, workdir: Path, port: int | None = None, settings: BrokerSettings | None = None
    ) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise FleetMisuseError(
                "no MQTT broker given and Mosquitto is not installed: install it "
                "(apt-get install mosquitto) or pass --broker mqtt://host:port"
            )
        self.exe = exe
        self.settings = settings or BrokerSettings()
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        s = self.settings
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"persistence {'true' if s.persistence else 'false'}\n"
            f"persistence_location {workdir}/\n"
            f"max_queued_messages {s.max_queued_messages}\n"
            f"max_inflight_messages {s.max_inflight_messages}\n"
            f"message_size_limit {s.message_size_limit}\n"
            "log_type error\nlog_type warning\n"
        )

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> ManagedBroker:
        """Start and wait for a CONNACK. Raises FleetTransportError when it does not come up."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        out = self.log.open("ab")
        try:
            self.proc = subprocess.Popen(
                [self.exe, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT
            )
        finally:
            out.close()
        if not mqtt_ready(self.host, self.port, self.settings.ready_timeout_s):
            self.stop()
            tail = self.log.read_text(errors="replace")[-500:]
            raise FleetTransportError(f"Mosquitto did not accept connections on port {self.port}: {tail}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """An abrupt broker crash (SIGKILL): no session is saved beyond the last autosave."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down `down_s` seconds, start again on the same port."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def __enter__(self) -> ManagedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker(workdir: Path, settings: BrokerSettings | None = None) -> ManagedBroker:
    """Start a private Mosquitto in `workdir` on a free port (see the module docstring)."""
    return ManagedBroker(workdir, settings=settings).start()


def parse_broker_url(url: str) -> tuple[str, int]:
    """`mqtt://host:port` (or `host:port`) -> (host, port). Raises FleetMisuseError."""
    rest = url.split("://", 1)[1] if "://" in url else url
    if url.startswith(("mqtts://", "ssl://")):
        raise FleetMisuseError("TLS broker URLs are not supported by the simulator; use mqtt://host:port")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FleetMisuseError(f"broker URL {url!r}: expected mqtt://host:port")
    return host, int(port)
