"""Signed device reports over a real Mosquitto: only the device's own key, for this topic and
payload, once. Each attack is refused with its reason, counted, and changes nothing."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.contract.protocol import Event, ReportedState, Topics, encode_event, encode_reported
from agent.daemon.report_signer import ReportSigner
from agent.transport import Message
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.publisher import Publisher
from fleet.delivery.report_verify import ReportVerifier
from fleet.metrics import FleetMetrics, MetricSources
from fleet.rollouts.records import RolloutRecords
from fleet.store import Store
from tests.support.broker import Broker
from tests.support.postgres import Backend
from tests.support.report_signing import DeviceKey


def _wait(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        done.wait(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _state(active: str, t: float, online: bool = True, device: str = "dev-a") -> bytes:
    return encode_reported(ReportedState(device_id=device, state="idle", active_bundle=active, timestamp=t,
                                         online=online))


@dataclass
class Rig:
    store: Store
    gate: ReportVerifier
    pub: Publisher
    link: MqttTransport  # publishes as any device (the broker's ACL is "misconfigured": anonymous)
    prefix: str
    a: DeviceKey
    b: DeviceKey
    events: list[tuple[str, Event]]

    def send(self, device: str, kind: str, payload: bytes, props: tuple[tuple[str, str], ...] = ()) -> None:
        topics = Topics(self.prefix, device)
        topic = {"reported": topics.reported(), "events": topics.events(),
                 "telemetry": topics.telemetry()}[kind]
        self.link.publish(topic, payload, qos=1, user_properties=props)

    def settle(self) -> None:
        """A valid report of device b after everything sent: once it is stored, all before it were seen."""
        marker = f"marker-{secrets.token_hex(4)}"
        payload = _state(marker, 1.0, device="dev-b")
        self.send("dev-b", "reported", payload, self.b.props("reported", payload))
        _wait(lambda: (self.store.devices.get("dev-b").reported_state or {}).get("active_bundle") == marker,
              "the marker report")

    def refused(self, kind: str, reason: str) -> int:
        return self.gate.refused()[(kind, reason)]

    def active(self, device: str = "dev-a") -> str | None:
        return (self.store.devices.get(device).reported_state or {}).get("active_bundle")


def _rig(mosquitto: Broker, location: Path | str, repo: Path, mode: str = "required") -> Iterator[Rig]:
    store = Store(location)
    prefix = f"ef-sig-{secrets.token_hex(3)}"
    for dev in ("dev-a", "dev-b", "dev-old"):
        store.devices.create(dev, {"env": "prod"}, {}, dev, "$7$x", "test")
    a, b = DeviceKey("dev-a").register(store), DeviceKey("dev-b").register(store)
    pub = Publisher(MqttConfig(port=mosquitto.port, client_id=f"pub-{prefix}"), prefix, repo)
    gate = ReportVerifier(store.report_keys, prefix, mode, on_offline=store.devices.mark_offline)  # type: ignore[arg-type]
    pub.inbound_check = gate  # as fleet.components wires it
    pub.on_reported(lambda dev, st: store.devices.on_reported(dev, st, gate.last_signed))
    events: list[tuple[str, Event]] = []
    pub.on_event(lambda dev, ev: events.append((dev, ev)))
    pub.on_telemetry(lambda dev, payload: None)
    pub.start()
    link = MqttTransport(MqttConfig(port=mosquitto.port, client_id=f"dev-{prefix}"))
    link.connect(10)
    try:
        yield Rig(store, gate, pub, link, prefix, a, b, events)
    finally:
        link.close()
        pub.stop()
        store.close()


@pytest.fixture
def rig(mosquitto: Broker, backend: Backend, tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(mosquitto, backend.location(), tmp_path / "repo")


@pytest.mark.integration
def test_attacks_are_refused_with_their_reason_and_change_nothing(rig: Rig) -> None:
    good = _state("mlp-2.0.0", 10.0)
    first = rig.a.props("reported", good)
    rig.send("dev-a", "reported", good, first)
    _wait(lambda: rig.active() == "mlp-2.0.0", "the signed report")
    assert rig.store.report_keys.last_counters("dev-a")["reported"] == 1
    row = rig.store.devices.get("dev-a")

    forged = _state("mlp-9.9.9", 11.0)
    rig.send("dev-a", "reported", forged, rig.b.props("reported", forged, device_id="dev-a"))  # b's key
    rig.send("dev-a", "reported", forged, rig.b.props("reported", forged))  # b reports on a's topic
    rig.send("dev-a", "reported", forged)  # unsigned
    rig.send("dev-a", "reported", forged, rig.a.props("reported", good))  # tampered: a signed `good`
    rig.send("dev-a", "reported", forged, rig.a.props("events", forged))  # signed for another topic kind
    second = _state("mlp-2.0.0", 12.0)
    second_props = rig.a.props("reported", second)  # counter 4 (2 and 3 went to the forgeries above)
    rig.send("dev-a", "reported", second, second_props)
    rig.send("dev-a", "reported", good, first)  # replayed: counter 1 < 4
    rig.send("dev-a", "reported", second, second_props)  # the same message again: a duplicate
    rig.settle()

    assert rig.refused("reported", "bad_signature") == 4
    assert rig.refused("reported", "unsigned") == 1
    assert rig.refused("reported", "replayed") == 1
    assert rig.refused("reported", "duplicate") == 1
    after = rig.store.devices.get("dev-a")
    assert after.reported_state is not None and after.reported_state["timestamp"] == 12.0  # only `second`
    assert rig.active() == "mlp-2.0.0" and after.last_seen is not None and row.last_seen is not None
    assert rig.store.report_keys.last_counters("dev-a")["reported"] == 4


@pytest.mark.integration
def test_events_and_telemetry_are_checked_per_kind(rig: Rig) -> None:
    ev = encode_event(Event(type="committed", bundle_id="mlp-2.0.0", timestamp=1.0, seq=1))
    header = rig.a.props("events", ev)
    rig.send("dev-a", "events", ev, header)
    rig.send("dev-a", "events", ev, header)  # redelivered copy
    rig.send("dev-a", "events", ev, rig.b.props("events", ev, device_id="dev-a"))
    rig.send("dev-a", "telemetry", b"\x00not-checked-here", rig.a.props("telemetry", b"\x00not-checked-here"))
    rig.send("dev-a", "telemetry", b"forged")
    rig.settle()
    assert [(d, e.type) for d, e in rig.events] == [("dev-a", "committed")]
    assert rig.refused("events", "duplicate") == 1 and rig.refused("events", "bad_signature") == 1
    assert rig.refused("telemetry", "unsigned") == 1
    counters = rig.store.report_keys.last_counters("dev-a")
    assert counters["events"] == 1 and counters["telemetry"] == 2  # one counter per device, kept per kind


@pytest.mark.integration
def test_a_keyless_device_is_refused_when_signatures_are_required(rig: Rig) -> None:
    payload = _state("mlp-2.0.0", 1.0, device="dev-old")
    rig.send("dev-old", "reported", payload)
    unregistered = DeviceKey("dev-old")
    rig.send("dev-old", "reported", payload, unregistered.props("reported", payload))
    rig.settle()
    assert rig.refused("reported", "unsigned") == 1 and rig.refused("reported", "unknown_key") == 1
    assert rig.store.devices.get("dev-old").reported_state is None


@pytest.mark.integration
def test_a_restarted_agent_keeps_signing_above_its_old_counters(rig: Rig, tmp_path: Path) -> None:
    state_dir = tmp_path / "agent-state"
    key = DeviceKey("dev-c").install(state_dir)
    rig.store.devices.create("dev-c", {}, {}, "dev-c", "$7$x", "test")
    key.register(rig.store)
    stopped = lambda: 0.0  # noqa: E731 - the clock must not be what saves us
    before = ReportSigner.load(state_dir, "dev-c", clock=stopped)
    assert before is not None
    for i in range(3):
        p = _state(f"v{i}", float(i), device="dev-c")
        rig.send("dev-c", "reported", p, before.sign("reported", p))
    _wait(lambda: rig.active("dev-c") == "v2", "the first run's reports")
    after = ReportSigner.load(state_dir, "dev-c", clock=stopped)  # a crash: `before` never closed
    assert after is not None
    p = _state("after-restart", 9.0, device="dev-c")
    rig.send("dev-c", "reported", p, after.sign("reported", p))
    rig.settle()
    assert rig.active("dev-c") == "after-restart"
    assert rig.refused("reported", "replayed") == rig.refused("reported", "duplicate") == 0


@pytest.mark.integration
def test_a_replayed_signed_last_will_only_marks_the_device_offline(rig: Rig) -> None:
    will = _state("", 0.5, online=False)
    will_props = rig.a.props("reported", will)  # signed at connect: counter 1
    live = _state("mlp-2.0.0", 5.0)
    rig.send("dev-a", "reported", live, rig.a.props("reported", live))
    _wait(lambda: rig.store.devices.get("dev-a").online, "the live report")
    rig.send("dev-a", "reported", will, will_props)  # the broker publishes the will: a new counter
    _wait(lambda: not rig.store.devices.get("dev-a").online, "offline")
    back = _state("mlp-2.0.0", 6.0)
    rig.send("dev-a", "reported", back, rig.a.props("reported", back))
    _wait(lambda: rig.store.devices.get("dev-a").online, "back online")
    rig.send("dev-a", "reported", will, will_props)  # the retained will replayed
    _wait(lambda: not rig.store.devices.get("dev-a").online, "offline again")
    assert rig.active() == "mlp-2.0.0" and rig.gate.stale_wills == 1  # its content was dropped
    assert rig.refused("reported", "replayed") == 0  # counted as a will, not a refusal


@pytest.mark.integration
def test_metrics_count_refusals_by_kind_and_reason(rig: Rig) -> None:
    rig.send("dev-a", "reported", b"x")
    rig.settle()
    text = FleetMetrics(lambda api: MetricSources(store=rig.store, publisher=rig.pub, api=api)).render()
    samples = {(s.labels.get("kind"), s.labels.get("reason")): s.value
               for f in text_string_to_metric_families(text.decode()) if f.name == "edgefleet_reports_refused"
               for s in f.samples}
    assert samples[("reported", "unsigned")] == 1 and samples[("events", "replayed")] == 0


@pytest.fixture
def optional_rig(mosquitto: Broker, tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(mosquitto, tmp_path / "fleet.db", tmp_path / "repo", mode="optional")


@pytest.mark.integration
def test_optional_mode_lets_keyless_devices_in_unsigned_but_never_as_a_success(optional_rig: Rig) -> None:
    rig = optional_rig
    committed = _state("mlp-2.0.0", 1.0, device="dev-old")
    rig.send("dev-old", "reported", committed)
    ev = encode_event(Event(type="committed", bundle_id="mlp-2.0.0", timestamp=1.0, seq=1))
    rig.send("dev-old", "events", ev)
    ok = encode_event(Event(type="director_accepted", bundle_id="mlp-2.0.0", timestamp=1.0, seq=2))
    rig.send("dev-old", "events", ok)
    rig.send("dev-a", "reported", committed.replace(b"dev-old", b"dev-a"))  # a keyed device: still refused
    rig.settle()
    assert rig.active("dev-old") == "mlp-2.0.0"  # the inventory shows it ...
    # ... but rollouts do not read it (success comes from signed reports only)
    assert "dev-old" not in RolloutRecords(rig.store).reported_states(["dev-old"])
    assert "dev-b" in RolloutRecords(rig.store).reported_states(["dev-b"])
    assert [e.type for _, e in rig.events] == ["director_accepted"]
    assert rig.refused("events", "unsigned_success") == 1 and rig.refused("reported", "unsigned") == 1
    assert rig.gate.accepted_unsigned() == {"reported": 1, "events": 1, "telemetry": 0, "dataset": 0}


def test_a_redelivered_telemetry_report_goes_on_to_the_ingest_but_a_replay_of_reported_state_does_not(
        backend: Backend) -> None:
    """The acked telemetry stream: a worker that claimed a report's counter and died before storing
    it never acknowledged it, so the broker delivers it again. The ingest's (device, seq) claim
    stores it at most once; a reported state has no such claim, so its replay stays refused."""
    store = Store(backend.location())
    try:
        store.devices.create("dev-a", {"env": "prod"}, {}, "dev-a", "$7$x", "test")
        key = DeviceKey("dev-a").register(store)
        gate = ReportVerifier(store.report_keys, "ef-redeliver")
        topics = Topics("ef-redeliver", "dev-a")
        report = b"telemetry report bytes"
        tele = Message(topic=topics.telemetry(), payload=report,
                       user_properties=key.props("telemetry", report))
        assert gate(tele, redelivery=True)
        assert not gate(tele)  # on the publisher's connection, the same message again is refused ...
        assert gate(tele, redelivery=True)  # ... on the stream it is a redelivery: let on to the ingest
        state = _state("mlp-1.0.0", 1.0)
        rep = Message(topic=topics.reported(), payload=state, user_properties=key.props("reported", state))
        assert gate(rep, redelivery=True) and not gate(rep, redelivery=True)
        forged = Message(topic=topics.telemetry(), payload=report + b"!",
                         user_properties=tele.user_properties)
        assert not gate(forged, redelivery=True)  # a redelivery is still verified first
        assert gate.refused()[("reported", "duplicate")] == 1
        assert gate.refused()[("telemetry", "bad_signature")] == 1
    finally:
        store.close()
