"""A broker for the demo and the scenarios when none is given: a managed Mosquitto, else iotcore.

Why these settings: MQTT v5 is Mosquitto's default per client; `message_size_limit` must stay
above the chunk size plus headers (a 64 KiB chunk must pass), and `max_queued_messages`
is raised because Mosquitto's default of 1000 silently drops QoS 1 messages past it while a
swarm catches up. Persistence is on (in the broker's own directory) so that a restart in the
middle of a transfer keeps sessions and retained messages, as a production broker would.

When Mosquitto is not installed, or when asked (`prefer_embedded=True` or the environment
variable `EDGEFLEET_EMBEDDED_BROKER=1`), `start_broker` runs the embedded `iotcore` broker
(rumqttd in a child process; x86-64 wheels only, the `demo-embedded` extra). It speaks MQTT v5
only through a generated TOML file (a `[v5.1]` listener); its default payload limit of 20,480 B
would disconnect a 64 KiB chunk, so the limit is raised above the largest chunk plus headers,
and commit-log segments are bounded. It keeps nothing on disk: a restart loses sessions and
retained messages, so the broker-restart scenario needs Mosquitto. Its accept path wedges for
every new client (rumqtt#1062) after a client id holding `+ $ # /`, or after a reset before
CONNACK followed by a CONNECT with the same id; every id we generate passes `validate_id`
(`[A-Za-z0-9._-]`), readiness is a real MQTT v5 CONNECT/CONNACK under a fresh id, and
`accepting()` tells whether it has wedged.

Errors: `start_broker` raises `fleet.errors.FleetMisuseError` when no broker can be started
and `FleetTransportError` when it does not accept an MQTT CONNECT in time.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fleet.errors import FleetMisuseError, FleetTransportError

EMBEDDED_ENV = "EDGEFLEET_EMBEDDED_BROKER"
INSTALL_HINT = (
    "install Mosquitto (apt-get install mosquitto / brew install mosquitto) or, on x86-64, the "
    "embedded broker (pip install 'edgefleet[demo-embedded]', i.e. iotcore), or pass --broker mqtt://host:port"
)
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


@dataclass(frozen=True)
class BrokerSettings:
    """Limits written into the generated configuration."""

    message_size_limit: int = 1024 * 1024  # bytes; above the largest chunk + headers
    max_queued_messages: int = 100_000
    max_inflight_messages: int = 64
    persistence: bool = True
    ready_timeout_s: float = 10.0
    # Embedded (iotcore / rumqttd) only: Mosquitto has no equivalent settings here.
    max_connections: int = 10_000
    embedded_max_payload_size: int = 1024 * 1024  # as message_size_limit; > 128 KiB chunk + headers
    embedded_max_segment_size: int = 8 * 1024 * 1024  # per commit-log segment
    embedded_max_segment_count: int = 4  # segments kept per topic filter
    embedded_max_inflight: int = 100
    embedded_connection_timeout_ms: int = 10_000  # CONNECT must arrive within this after accept


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
    """True once the broker answers a real MQTT v5 CONNECT with a CONNACK (not just a TCP accept).

    Each attempt uses a fresh client id: rumqttd wedges when an id whose connection was reset
    before its CONNACK connects again (rumqtt#1062), and a timed-out probe can be such a reset.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-ready-{secrets.token_hex(6)}",
            protocol=paho.MQTTv5,
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

    kind = "Mosquitto"

    def __init__(
        self, workdir: Path, port: int | None = None, settings: BrokerSettings | None = None
    ) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise FleetMisuseError(
                f"no MQTT broker given and Mosquitto is not installed: {INSTALL_HINT}"
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

    def accepting(self, timeout: float = 2.0) -> bool:
        """True when a new client still gets a CONNACK."""
        return mqtt_ready(self.host, self.port, timeout)

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


def embedded_available() -> bool:
    """True when the `iotcore` package (the embedded broker) can be imported."""
    try:
        import iotcore  # noqa: F401
    except ImportError:
        return False
    return True


class EmbeddedBroker:
    """The `iotcore` broker (rumqttd) in a child process, configured by a generated TOML file.

    Same surface as `ManagedBroker`. It keeps no state on disk: `restart` and `kill` lose
    sessions and retained messages (scenarios that count on them need Mosquitto).
    Raises FleetMisuseError when iotcore is not installed.
    """

    kind = "embedded iotcore"

    def __init__(
        self, workdir: Path, port: int | None = None, settings: BrokerSettings | None = None
    ) -> None:
        try:
            from iotcore import Broker as IotcoreBroker
        except ImportError:
            msg = f"the embedded broker (iotcore) is not installed: {INSTALL_HINT}"
            raise FleetMisuseError(msg) from None
        self.settings = settings or BrokerSettings()
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = workdir / "iotcore.toml"
        workdir.mkdir(parents=True, exist_ok=True)
        s = self.settings
        self.conf.write_text(
            "id = 0\n\n[router]\nid = 0\n"
            f"max_connections = {s.max_connections}\n"
            "max_outgoing_packet_count = 200\n"
            f"max_segment_size = {s.embedded_max_segment_size}\n"
            f"max_segment_count = {s.embedded_max_segment_count}\n\n"
            '[v5.1]\nname = "v5-1"\n'
            f'listen = "{self.host}:{self.port}"\n'
            "next_connection_delay_ms = 1\n"
            "[v5.1.connections]\n"
            f"connection_timeout_ms = {s.embedded_connection_timeout_ms}\n"
            f"max_payload_size = {s.embedded_max_payload_size}\n"
            f"max_inflight_count = {s.embedded_max_inflight}\n"
        )
        try:
            self._broker = IotcoreBroker(config_path=str(self.conf))
        except Exception as exc:  # the native parser raises plain exceptions on a bad file
            raise FleetMisuseError(f"iotcore rejected the generated config {self.conf}: {exc}") from None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def accepting(self, timeout: float = 2.0) -> bool:
        """True when a new client still gets a CONNACK (False once rumqtt#1062 has wedged it)."""
        return mqtt_ready(self.host, self.port, timeout)

    def start(self) -> EmbeddedBroker:
        """Start and wait for a CONNACK. Raises FleetTransportError when it does not come up."""
        if self._broker.is_running:
            return self
        timeout = self.settings.ready_timeout_s
        try:
            self._broker.start(timeout=timeout)  # waits for the TCP listener only
        except (OSError, RuntimeError) as exc:
            raise FleetTransportError(f"iotcore did not start on port {self.port}: {exc}") from None
        if not mqtt_ready(self.host, self.port, timeout):
            self.stop()
            raise FleetTransportError(f"iotcore did not answer an MQTT v5 CONNECT on port {self.port}")
        return self

    def stop(self) -> None:
        self._broker.stop(timeout=10)

    def kill(self) -> None:
        """Same as `stop`: rumqttd keeps nothing on disk, so an abrupt crash loses the same state."""
        self.stop()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down `down_s` seconds, start again on the same port (state is lost)."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


AnyBroker = ManagedBroker | EmbeddedBroker


def embedded_requested(prefer_embedded: bool | None = None) -> bool:
    """`prefer_embedded` when given, else the `EDGEFLEET_EMBEDDED_BROKER` variable (1/true/yes)."""
    if prefer_embedded is not None:
        return prefer_embedded
    return os.environ.get(EMBEDDED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def start_broker(
    workdir: Path, settings: BrokerSettings | None = None, *, prefer_embedded: bool | None = None
) -> AnyBroker:
    """Start a private broker in `workdir` on a free port (see the module docstring).

    Mosquitto unless it is missing or the embedded broker is requested; then iotcore.
    Raises FleetMisuseError naming both install routes when neither is available, and
    FleetTransportError when the broker does not answer a CONNECT in time.
    """
    if not embedded_requested(prefer_embedded) and find_mosquitto() is not None:
        return ManagedBroker(workdir, settings=settings).start()
    if not embedded_available():
        why = (
            "the embedded broker was requested but iotcore is not installed"
            if embedded_requested(prefer_embedded)
            else "no MQTT broker given and neither Mosquitto nor iotcore is installed"
        )
        raise FleetMisuseError(f"{why}: {INSTALL_HINT}")
    return EmbeddedBroker(workdir, settings=settings).start()


def parse_broker_url(url: str) -> tuple[str, int]:
    """`mqtt://host:port` (or `host:port`) -> (host, port). Raises FleetMisuseError."""
    rest = url.split("://", 1)[1] if "://" in url else url
    if url.startswith(("mqtts://", "ssl://")):
        raise FleetMisuseError("TLS broker URLs are not supported by the simulator; use mqtt://host:port")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FleetMisuseError(f"broker URL {url!r}: expected mqtt://host:port")
    return host, int(port)
