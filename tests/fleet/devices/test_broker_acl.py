"""The packaged Mosquitto config and ACL confine each device to its own subtree.

Starts a private Mosquitto from `packaging/mosquitto/` (TLS lines dropped, ports and paths
moved to a temp dir) with password files made by `mosquitto_passwd -b`.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.contract.protocol import ReportedState, Topics, encode_reported
from agent.errors import TransportError
from agent.transport import Message
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from tests.support.broker import free_port, spawn_mosquitto, wait_port
from tests.support.packaged_broker import without_mtls_listener

ROOT = Path(__file__).resolve().parents[3]
PKG = ROOT / "packaging" / "mosquitto"
PREFIX = "edgefleet"
PASSWORDS = {"devA": "pw-a", "devB": "pw-b"}
FLEET_PW = "pw-fleet"


@dataclass
class AclBroker:
    device_port: int
    fleet_port: int
    proc: subprocess.Popen[bytes]


def _passwd(file: Path, users: dict[str, str]) -> None:
    for i, (user, pw) in enumerate(users.items()):
        args = ["mosquitto_passwd", "-b", str(file), user, pw]
        if i == 0:
            args.insert(1, "-c")
        subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclBroker]:
    work = tmp_path_factory.mktemp("aclbroker")
    dev_port, fleet_port = free_port(), free_port()
    conf = PKG.joinpath("mosquitto.conf").read_text()
    conf = "\n".join(
        line
        for line in conf.splitlines()
        if not re.match(
            r"^(certfile|keyfile|cafile|tls_version|require_certificate|use_identity_as_username|log_dest)\b",
            line,
        )
    )
    conf = conf.replace("listener 8883", f"listener {dev_port} 127.0.0.1")
    conf = conf.replace("listener 1884 127.0.0.1", f"listener {fleet_port} 127.0.0.1")
    conf = conf.replace("persistence true", "persistence false").replace("/var/lib/mosquitto/", f"{work}/")
    conf = conf.replace("/etc/mosquitto/", f"{work}/")
    (work / "edgefleet.acl").write_text(PKG.joinpath("acl").read_text())
    _passwd(work / "edgefleet.passwd", PASSWORDS)
    _passwd(work / "edgefleet-fleet.passwd", {"fleet": FLEET_PW})
    # As root, Mosquitto drops to user "mosquitto", which cannot enter pytest's 0700 temp dirs.
    stay = "user root\n" if os.geteuid() == 0 else ""
    (work / "mosquitto.conf").write_text(conf + "\nlog_dest stdout\n" + stay)
    proc = spawn_mosquitto(work / "mosquitto.conf", work / "mosquitto.log")
    wait_port("127.0.0.1", dev_port)
    wait_port("127.0.0.1", fleet_port)
    try:
        yield AclBroker(dev_port, fleet_port, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _client(
    broker: AclBroker, user: str, pw: str, *, client_id: str | None = None, fleet: bool = False
) -> MqttTransport:
    cfg = MqttConfig(
        port=broker.fleet_port if fleet else broker.device_port,
        client_id=client_id or user,
        username=user,
        password=pw,  # type: ignore[arg-type]
        reconnect_max_s=1.0,
        connect_timeout_s=3.0,
    )
    t = MqttTransport(cfg)
    t.connect()
    return t


class Inbox:
    def __init__(self) -> None:
        self.got: list[Message] = []
        self.event = threading.Event()

    def __call__(self, m: Message) -> None:
        self.got.append(m)
        self.event.set()

    def topics(self) -> set[str]:
        return {m.topic for m in self.got}


def _settle() -> None:
    time.sleep(0.4)  # long enough for the broker to route what it was going to route


@pytest.mark.integration
def test_device_reads_only_its_own_desired_and_responses(broker: AclBroker) -> None:
    fleet = _client(broker, "fleet", FLEET_PW, fleet=True)
    a = _client(broker, "devA", PASSWORDS["devA"])
    b = _client(broker, "devB", PASSWORDS["devB"])
    ta, tb = Topics(PREFIX, "devA"), Topics(PREFIX, "devB")
    inbox_a, inbox_b = Inbox(), Inbox()
    try:
        for flt in (
            tb.desired(),
            tb.responses(),
            f"{PREFIX}/v1/devices/+/desired",
            ta.desired(),
            ta.cohort_desired("eu"),
            ta.metadata("timestamp.json"),
        ):
            a.subscribe(flt, inbox_a)
        b.subscribe(tb.desired(), inbox_b)
        _settle()
        fleet.publish(tb.desired(), b"doc-for-B", retain=True)
        fleet.publish(tb.responses(), b"chunk-for-B")
        fleet.publish(ta.desired(), b"doc-for-A", retain=True)
        fleet.publish(ta.cohort_desired("eu"), b"cohort-doc", retain=True)
        fleet.publish(ta.metadata("timestamp.json"), b"ts", retain=True)
        assert inbox_b.event.wait(5)
        _settle()
        assert {m.payload for m in inbox_b.got} == {b"doc-for-B"}
        assert b"doc-for-B" not in {m.payload for m in inbox_a.got}
        assert b"chunk-for-B" not in {m.payload for m in inbox_a.got}
        assert {b"doc-for-A", b"cohort-doc", b"ts"} <= {m.payload for m in inbox_a.got}
    finally:
        clears = [
            fleet.publish(topic, b"", retain=True)
            for topic in (tb.desired(), ta.desired(), ta.cohort_desired("eu"), ta.metadata("timestamp.json"))
        ]
        for delivery in clears:  # acknowledged before close, so the next test sees no retained docs
            delivery.wait_for_publish(5)
        for t in (a, b, fleet):
            t.close()


@pytest.mark.integration
def test_device_writes_only_its_own_topics(broker: AclBroker) -> None:
    fleet = _client(broker, "fleet", FLEET_PW, fleet=True)
    a = _client(broker, "devA", PASSWORDS["devA"])
    ta, tb = Topics(PREFIX, "devA"), Topics(PREFIX, "devB")
    seen = Inbox()
    try:
        fleet.subscribe(f"{PREFIX}/v1/#", seen)
        _settle()
        forged = encode_reported(ReportedState(state="committed", timestamp=1.0))
        for topic in (
            tb.reported(),
            tb.events(),
            tb.telemetry(),
            tb.dataset(),  # another device's dataset topic (issue 13)
            tb.requests(),
            tb.desired(),
            ta.desired(),
            ta.responses(),
            ta.cohort_desired("eu"),
            ta.metadata("timestamp.json"),
        ):
            a.publish(topic, forged)  # accepted by the client, dropped by the broker
        for topic in (ta.reported(), ta.events(), ta.telemetry(), ta.dataset(), ta.requests()):
            a.publish(topic, b"own")
        deadline = time.monotonic() + 5
        while len(seen.got) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        _settle()
        assert seen.topics() == {ta.reported(), ta.events(), ta.telemetry(), ta.dataset(), ta.requests()}
        assert {m.payload for m in seen.got} == {b"own"}
        a.publish(ta.reported(), b"", retain=True)
    finally:
        a.close()
        fleet.close()


@pytest.mark.integration
def test_wrong_password_and_fleet_listener_refuse(broker: AclBroker) -> None:
    with pytest.raises(TransportError, match="refusal"):
        bad = MqttTransport(
            MqttConfig(
                port=broker.device_port,
                client_id="devA",
                username="devA",
                password="nope",
                connect_timeout_s=1.0,
            )
        )  # type: ignore[arg-type]
        try:
            bad.connect(timeout=2.0)
        finally:
            bad.close()
    with pytest.raises(TransportError):  # device credentials are not valid on the fleet listener
        dev = MqttTransport(
            MqttConfig(
                port=broker.fleet_port,
                client_id="devA",
                username="devA",
                password=PASSWORDS["devA"],
                connect_timeout_s=1.0,
            )
        )  # type: ignore[arg-type]
        try:
            dev.connect(timeout=2.0)
        finally:
            dev.close()


@pytest.mark.integration
def test_client_id_spoofing_cannot_take_over_a_session(broker: AclBroker) -> None:
    b = _client(broker, "devB", PASSWORDS["devB"])
    try:
        a_as_b = _client(broker, "devA", PASSWORDS["devA"], client_id="devB")
        _settle()
        assert b.connected and b.connects == 1  # not kicked off by a duplicate client id
        a_as_b.close()
    finally:
        b.close()


@pytest.mark.integration
def test_shared_subscription_for_publisher_workers(broker: AclBroker) -> None:
    w1 = _client(broker, "fleet", FLEET_PW, client_id="fleet-w1", fleet=True)
    w2 = _client(broker, "fleet", FLEET_PW, client_id="fleet-w2", fleet=True)
    a = _client(broker, "devA", PASSWORDS["devA"])
    in1, in2 = Inbox(), Inbox()
    try:
        flt = Topics(PREFIX).all_requests("fleet")
        w1.subscribe(flt, in1)
        w2.subscribe(flt, in2)
        _settle()
        for i in range(20):
            a.publish(Topics(PREFIX, "devA").requests(), f"r{i}".encode())
        deadline = time.monotonic() + 5
        while len(in1.got) + len(in2.got) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        _settle()
        assert len(in1.got) + len(in2.got) == 20  # each request to exactly one worker
        assert in1.got and in2.got
    finally:
        for t in (a, w1, w2):
            t.close()


def _pki(work: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and client certificates CN=devA/devB."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (work / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (work / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("edgefleet test CA"))
        .issuer_name(name("edgefleet test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_key, ca)
    for stem, cn in (("server", "localhost"), ("devA", "devA"), ("devB", "devB")):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if stem == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        write(stem, key, builder.sign(ca_key, hashes.SHA256()))
    return {s: work / f"{s}.crt" for s in ("ca", "server", "devA", "devB")}


@pytest.mark.integration
def test_tls_listener_with_client_certificates(tmp_path: Path) -> None:
    """The packaged TLS listener with require_certificate: the certificate's CN is the device id."""
    _pki(tmp_path)
    dev_port, fleet_port = free_port(), free_port()
    # The password listener switched to client certificates (the packaged mutual-TLS listener,
    # with the fleet's device CA and CRL, is tested in test_mtls_broker.py and left out here).
    lines = without_mtls_listener(PKG.joinpath("mosquitto.conf").read_text().splitlines())
    # No device passwords: the certificate is the identity. The fleet keeps its password file.
    conf = "\n".join(
        ln for ln in lines if not ln.startswith("log_dest") and "edgefleet.passwd" not in ln
    )
    conf = conf.replace("listener 8883", f"listener {dev_port} 127.0.0.1")
    conf = conf.replace("listener 1884 127.0.0.1", f"listener {fleet_port} 127.0.0.1")
    conf = conf.replace("require_certificate false", "require_certificate true")
    conf = conf.replace("use_identity_as_username false", "use_identity_as_username true")
    conf = conf.replace("persistence true", "persistence false").replace(
        "/var/lib/mosquitto/", f"{tmp_path}/"
    )
    conf = conf.replace("/etc/mosquitto/certs/", f"{tmp_path}/").replace("/etc/mosquitto/", f"{tmp_path}/")
    (tmp_path / "edgefleet.acl").write_text(PKG.joinpath("acl").read_text())
    _passwd(tmp_path / "edgefleet-fleet.passwd", {"fleet": FLEET_PW})
    stay = "user root\n" if os.geteuid() == 0 else ""
    (tmp_path / "mosquitto.conf").write_text(conf + "\nlog_dest stdout\n" + stay)
    proc = spawn_mosquitto(tmp_path / "mosquitto.conf", tmp_path / "mosquitto.log")
    wait_port("127.0.0.1", dev_port)
    broker = AclBroker(dev_port, fleet_port, proc)
    fleet = _client(broker, "fleet", FLEET_PW, fleet=True)

    def device(cert: str | None, client_id: str) -> MqttTransport:
        return MqttTransport(
            MqttConfig(
                port=dev_port,
                client_id=client_id,
                tls=True,
                ca_file=tmp_path / "ca.crt",
                cert_file=tmp_path / f"{cert}.crt" if cert else None,
                key_file=tmp_path / f"{cert}.key" if cert else None,
                connect_timeout_s=2.0,
                reconnect_max_s=0.5,
            )
        )

    seen = Inbox()
    a = device("devA", "devA")
    try:
        fleet.subscribe(f"{PREFIX}/v1/devices/+/reported", seen)
        a.connect(timeout=10)
        _settle()
        a.publish(Topics(PREFIX, "devB").reported(), b"forged")  # CN=devA may not write devB's topics
        a.publish(Topics(PREFIX, "devA").reported(), b"own")
        assert seen.event.wait(5)
        _settle()
        assert [(m.topic, m.payload) for m in seen.got] == [(Topics(PREFIX, "devA").reported(), b"own")]
        no_cert = device(None, "devC")
        with pytest.raises(TransportError):
            no_cert.connect(timeout=2.0)
        no_cert.close()
    finally:
        a.close()
        fleet.close()
        proc.terminate()
        proc.wait(timeout=10)
