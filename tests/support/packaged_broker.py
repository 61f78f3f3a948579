"""The packaged Mosquitto config (`packaging/mosquitto/`) on free loopback ports, and a paho device.

Per-listener settings are kept; the device listener checks logins against a password file the
caller names (the one the fleet writes at enrollment), the fleet listener against a file with
user `fleet` / `FLEET_PW`. Mosquitto writes a pid file, so the fleet's reload hook can SIGHUP it.

Without `tls` the TLS lines are dropped and the mutual-TLS listener is left out. With a
`BrokerTls` every listener keeps its TLS lines: the password device listener and the mutual-TLS
one serve a server certificate for 127.0.0.1 signed by a test CA, and the mutual-TLS listener
takes client certificates from the fleet's device CA and checks them against its CRL.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.devices.enrollment import mosquitto_password_hash
from tests.support.broker import free_port, spawn_mosquitto, wait_port

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "packaging" / "mosquitto"
FLEET_PW = "pw-fleet"


@dataclass(frozen=True)
class BrokerTls:
    """Files for the TLS listeners: the server's certificate and key, and the fleet's device CA and CRL."""

    server_cert: Path
    server_key: Path
    server_ca: Path
    device_ca: Path
    crl: Path


@dataclass
class PackagedBroker:
    device_port: int
    fleet_port: int
    pid_file: Path
    log: Path
    proc: subprocess.Popen[bytes]
    mtls_port: int | None = None
    conf: Path | None = None

    def restart(self) -> None:
        """Stop and start again with the same config and ports."""
        assert self.conf is not None
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = spawn_mosquitto(self.conf, self.log)
        for port in (self.device_port, self.fleet_port, self.mtls_port):
            if port is not None:
                wait_port("127.0.0.1", port)


def without_mtls_listener(lines: list[str]) -> list[str]:
    start = lines.index("listener 8884")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("# ----"))
    while start > 0 and lines[start - 1].startswith("#"):  # its comment block
        start -= 1
    return lines[:start] + lines[end:]


def start_packaged_broker(work: Path, device_passwd: Path, tls: BrokerTls | None = None) -> PackagedBroker:
    """The packaged config on free loopback ports, password devices checked against `device_passwd`."""
    work.mkdir(parents=True, exist_ok=True)
    dev_port, fleet_port, mtls_port = free_port(), free_port(), free_port()
    lines = PKG.joinpath("mosquitto.conf").read_text().splitlines()
    drop = r"^(log_dest|log_type)\b"
    if tls is None:
        lines = without_mtls_listener(lines)
        drop = (r"^(certfile|keyfile|cafile|crlfile|tls_version|require_certificate|"
                r"use_identity_as_username|log_dest|log_type)\b")
    conf = "\n".join(line for line in lines if not re.match(drop, line))
    if tls is not None:
        conf = conf.replace("listener 8884", f"listener {mtls_port} 127.0.0.1")
        conf = conf.replace("/etc/mosquitto/certs/server.crt", str(tls.server_cert))
        conf = conf.replace("/etc/mosquitto/certs/server.key", str(tls.server_key))
        conf = conf.replace("/etc/mosquitto/certs/ca.crt", str(tls.server_ca))
        conf = conf.replace("/etc/mosquitto/edgefleet-device-ca.crt", str(tls.device_ca))
        conf = conf.replace("/etc/mosquitto/edgefleet-devices.crl", str(tls.crl))
    conf = conf.replace("listener 8883", f"listener {dev_port} 127.0.0.1")
    conf = conf.replace("listener 1884 127.0.0.1", f"listener {fleet_port} 127.0.0.1")
    conf = conf.replace("persistence true", "persistence false").replace("/var/lib/mosquitto/", f"{work}/")
    conf = conf.replace("/etc/mosquitto/edgefleet.passwd", str(device_passwd))
    conf = conf.replace("/etc/mosquitto/", f"{work}/")
    (work / "edgefleet.acl").write_text(PKG.joinpath("acl").read_text())
    fleet_pw = work / "edgefleet-fleet.passwd"
    fleet_pw.write_text(f"fleet:{mosquitto_password_hash(FLEET_PW)}\n")
    fleet_pw.chmod(0o600)
    stay = "user root\n" if os.geteuid() == 0 else ""  # root would drop to "mosquitto", locked out of tmp
    pid_file = work / "mosquitto.pid"  # written by Mosquitto (Debian: /run/mosquitto/mosquitto.pid)
    (work / "mosquitto.conf").write_text(conf + f"\nlog_dest stdout\npid_file {pid_file}\n" + stay)
    log = work / "mosquitto.log"
    proc = spawn_mosquitto(work / "mosquitto.conf", log)
    for port in (dev_port, fleet_port, *([mtls_port] if tls else [])):
        wait_port("127.0.0.1", port)
    assert pid_file.read_text().strip() == str(proc.pid)
    return PackagedBroker(dev_port, fleet_port, pid_file, log, proc, mtls_port if tls else None,
                          work / "mosquitto.conf")


class DeviceClient:
    """A paho MQTT v5 client logged in as a device; records CONNACK codes and disconnects."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.connacks: list[mqtt.ReasonCode] = []
        self.disconnected = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.got = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, c: Any, u: Any, f: Any, rc: mqtt.ReasonCode, p: Any) -> None:
        self.connacks.append(rc)
        self.connected.set()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.append((msg.topic, bytes(msg.payload)))
        self.got.set()

    def first_connack(self) -> mqtt.ReasonCode:
        assert self.connected.wait(10), "no CONNACK within 10 s"
        return self.connacks[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
