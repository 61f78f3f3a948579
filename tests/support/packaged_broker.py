"""The packaged Mosquitto config (`packaging/mosquitto/`) on free loopback ports, and a paho device.

TLS lines are dropped and per-listener settings kept; the device listener checks logins against
a password file the caller names (the one the fleet writes at enrollment), the fleet listener
against a file with user `fleet` / `FLEET_PW`. Mosquitto writes a pid file, so the fleet's reload
hook can SIGHUP it.
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


@dataclass
class PackagedBroker:
    device_port: int
    fleet_port: int
    pid_file: Path
    log: Path
    proc: subprocess.Popen[bytes]


def start_packaged_broker(work: Path, device_passwd: Path) -> PackagedBroker:
    """The packaged config without TLS, on free loopback ports, devices checked against `device_passwd`."""
    work.mkdir(parents=True, exist_ok=True)
    dev_port, fleet_port = free_port(), free_port()
    conf = "\n".join(
        line for line in PKG.joinpath("mosquitto.conf").read_text().splitlines()
        if not re.match(r"^(certfile|keyfile|cafile|tls_version|require_certificate|use_identity_as_username|"
                        r"log_dest|log_type)\b", line))
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
    wait_port("127.0.0.1", dev_port)
    wait_port("127.0.0.1", fleet_port)
    assert pid_file.read_text().strip() == str(proc.pid)
    return PackagedBroker(dev_port, fleet_port, pid_file, log, proc)


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
