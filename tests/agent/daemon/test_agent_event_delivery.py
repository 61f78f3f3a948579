"""Events are delivered at least once, across reconnects and crashes (docs/protocol.md, "Events").

The agent's outbox keeps an event until the broker's PUBACK; the fleet drops redeliveries by
(device_id, seq). The integration tests put a real Mosquitto behind an MQTT-aware TCP proxy
(`simulators.faults.FaultProxy`) that can swallow the device's PUBLISH packets, so a PUBACK
deterministically never arrives; the agent is a real process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import pytest

from agent.contract.protocol import Event, Topics, encode_event
from agent.daemon.events import EventOutbox
from agent.transport import Message
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from fleet.delivery.dedupe import EventDeduper
from simulators.faults import FaultPlan, FaultProxy, parse_publish
from tests.support.agent_world import make_agent, running_fleet, wait_until
from tests.support.broker import Broker, start_mosquitto


class Handle:
    """A delivery handle whose acknowledgement the unit tests control."""

    def __init__(self, acked: bool = False, broken: bool = False) -> None:
        self.acked = acked
        self.broken = broken

    def is_published(self) -> bool:
        if self.broken:
            raise RuntimeError("publish failed")
        return self.acked


class Sender:
    """`send` for `EventOutbox.drain`: records payloads, returns fresh handles (None = offline)."""

    def __init__(self, online: bool = True) -> None:
        self.online = online
        self.sent: list[bytes] = []
        self.handles: list[Handle] = []

    def __call__(self, payload: bytes) -> Handle | None:
        if not self.online:
            return None
        self.sent.append(payload)
        self.handles.append(Handle())
        return self.handles[-1]


def memory_outbox(max_events: int = 1000) -> EventOutbox:
    return EventOutbox(Path(":memory:"), max_events)


def one_in_flight(max_events: int = 1000) -> tuple[EventOutbox, Sender]:
    """An outbox whose one event, b"a", was handed to a sender and is not acknowledged yet."""
    box = memory_outbox(max_events)
    box.put(b"a")
    send = Sender()
    box.drain(send)
    return box, send


# --- the outbox's bookkeeping (in-memory SQLite) ------------------------------------------------
@pytest.mark.unit
def test_an_event_stays_until_its_puback_and_is_handed_over_once() -> None:
    box = memory_outbox()
    for i in range(3):
        box.put(f"e{i}".encode())
    send = Sender()
    assert box.drain(send) == 3 and send.sent == [b"e0", b"e1", b"e2"]
    assert len(box) == 3 and box.in_flight == 3  # queued in the client is not delivered
    assert box.drain(send) == 0 and len(send.sent) == 3  # not handed over twice in one process
    send.handles[1].acked = True
    box.drain(send)
    assert len(box) == 2 and box.in_flight == 2  # only the acknowledged one left
    send.handles[0].acked = send.handles[2].acked = True
    box.drain(send)
    assert len(box) == 0 and box.in_flight == 0


@pytest.mark.unit
def test_an_idle_outbox_is_drained_without_touching_the_database() -> None:
    box = memory_outbox()
    box.put(b"e0")
    send = Sender()
    assert box.drain(send) == 1
    statements: list[str] = []
    box._db.set_trace_callback(statements.append)
    assert box.drain(send) == 0 and statements == []  # in flight, nothing unsent: no query
    send.handles[0].acked = True
    box.drain(send)
    assert statements == ["DELETE FROM events WHERE id = 1"]  # forgets the acknowledged one
    assert len(box) == 0
    statements.clear()
    assert box.drain(send) == 0 and statements == []
    box.put(b"e1")
    assert box.drain(send) == 1 and send.sent == [b"e0", b"e1"]


@pytest.mark.unit
def test_offline_stops_the_drain_and_order_is_kept() -> None:
    box, send = one_in_flight()
    box.put(b"b")
    box.put(b"c")
    send.online = False
    assert box.drain(send) == 0 and send.sent == [b"a"]
    send.online = True
    assert box.drain(send) == 2 and send.sent == [b"a", b"b", b"c"]


@pytest.mark.unit
def test_the_bound_drops_the_oldest_events_in_flight_or_not() -> None:
    box, send = one_in_flight(max_events=2)  # "a" in flight
    box.put(b"b")
    box.put(b"c")  # "a" dropped although in flight
    assert len(box) == 2 and box.in_flight == 0
    assert box.drain(send) == 2 and send.sent == [b"a", b"b", b"c"]


@pytest.mark.unit
def test_a_handle_the_client_gave_up_on_is_handed_over_again() -> None:
    box, send = one_in_flight()
    send.handles[0].broken = True
    assert box.drain(send) == 1 and send.sent == [b"a", b"a"]


@pytest.mark.unit
def test_wait_acknowledged_times_out_then_succeeds() -> None:
    box, send = one_in_flight()
    assert box.wait_acknowledged(0.05) is False and len(box) == 1
    threading.Timer(0.05, lambda: setattr(send.handles[0], "acked", True)).start()
    assert box.wait_acknowledged(10.0) is True and len(box) == 0


@pytest.mark.integration
def test_events_handed_over_but_not_acknowledged_are_sent_again_after_a_reopen(tmp_path: Path) -> None:
    box = EventOutbox(tmp_path / "events.sqlite")
    for i in range(3):
        box.put(f"e{i}".encode())
    send = Sender()
    box.drain(send)
    send.handles[0].acked = True
    box.drain(send)
    box.close()  # e1 and e2 were sent but never acknowledged: the process "died"
    box = EventOutbox(tmp_path / "events.sqlite")
    again = Sender()
    assert box.drain(again) == 2 and again.sent == [b"e1", b"e2"]
    box.close()


# --- the fleet side ---------------------------------------------------------------------------
def _event(seq: int, kind: str = "rolled_back") -> Event:
    return Event(device_id="d1", type=kind, timestamp=1.0, seq=seq)


@pytest.mark.unit
def test_the_fleet_passes_each_device_and_seq_once_within_its_memory() -> None:
    seen: list[tuple[str, int]] = []
    dedupe = EventDeduper(lambda d, e: seen.append((d, e.seq)), capacity=2)
    for device, seq in [("d1", 1), ("d1", 1), ("d2", 1), ("d1", 2), ("d1", 2)]:
        dedupe(device, _event(seq))
    assert seen == [("d1", 1), ("d2", 1), ("d1", 2)] and dedupe.duplicates == 2
    dedupe("d1", _event(1))  # forgotten (capacity 2): passes again, consumers stay idempotent
    assert seen[-1] == ("d1", 1)


# --- real broker ------------------------------------------------------------------------------
class Blackhole(FaultProxy):
    """Swallows the device's PUBLISH packets while `holding`: no PUBACK ever comes back."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker.host, broker.port, FaultPlan(direction="up"))
        self.holding = False
        self.swallowed: list[tuple[str, bytes]] = []
        self._mutex = threading.Lock()

    async def _fault(self, packet: bytes, dst: asyncio.StreamWriter, back: asyncio.StreamWriter) -> bytes:
        if not self.holding:
            return packet
        _qos, topic, _pid, payload_at = parse_publish(packet)
        with self._mutex:
            self.swallowed.append((topic, packet[payload_at:]))
        return b""

    def swallowed_events(self) -> list[dict[str, object]]:
        with self._mutex:
            return [json.loads(p) for t, p in self.swallowed if t.endswith("/events")]


def _subscriber(broker: Broker, topic: str) -> tuple[MqttTransport, list[Message]]:
    got: list[Message] = []
    config = MqttConfig(port=broker.port, client_id=f"sub-{time.monotonic_ns()}", clean_start=True)
    sub = MqttTransport(config)
    sub.subscribe(topic, got.append)
    sub.connect(10)
    return sub, got


@pytest.mark.integration
def test_paho_resends_an_unacknowledged_event_after_a_reconnect_and_the_outbox_then_forgets_it(
    tmp_path: Path,
) -> None:
    broker = start_mosquitto(tmp_path / "broker")
    topics = Topics("ack", "dev-r")
    with Blackhole(broker) as proxy:
        sub, got = _subscriber(broker, topics.events())
        device = MqttTransport(
            MqttConfig(port=proxy.port, client_id="dev-r", reconnect_min_s=0.05, reconnect_max_s=0.2)
        )
        box = EventOutbox(tmp_path / "events.sqlite")
        try:
            device.connect(10)
            proxy.holding = True
            box.put(encode_event(_event(7)))
            assert box.drain(lambda p: device.publish(topics.events(), p, qos=1)) == 1
            wait_until(lambda: proxy.swallowed_events(), 10, "the proxy to swallow the event")
            time.sleep(0.3)
            assert box.in_flight == 1 and len(box) == 1 and not got  # no PUBACK, not delivered
            proxy.holding = False
            proxy.cut_all()  # the connection drops; paho reconnects and sends it again itself
            wait_until(lambda: got, 20, "the event re-sent by paho after the reconnect")

            def forgotten() -> bool:
                box.drain(lambda p: device.publish(topics.events(), p, qos=1))
                return len(box) == 0

            wait_until(forgotten, 10, "the outbox to forget the acknowledged event")
            assert json.loads(got[0].payload)["seq"] == 7
            assert len(proxy.swallowed_events()) == 1  # handed to paho once, not again by the outbox
        finally:
            box.close()
            device.close()
            sub.close()
            broker.stop()


@pytest.mark.integration
def test_an_event_whose_puback_never_came_is_delivered_after_the_agent_is_killed(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        with Blackhole(fleet.broker) as proxy:
            agent = make_agent(fleet, "dev-ack", broker_port=proxy.port, http=False).start()
            try:
                wait_until(
                    lambda: (s := fleet.state("dev-ack")) is not None and s.online, 30, "the agent online"
                )
                proxy.holding = True  # from now on the agent's PUBLISHes vanish without a PUBACK
                fleet.issue("dev-ack", "mlp-1.0.0")
                accepted = wait_until(
                    lambda: [e for e in proxy.swallowed_events() if e["type"] == "director_accepted"],
                    30,
                    "the agent to publish director_accepted",
                )[0]
                assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
                assert not fleet.events_of("dev-ack", "director_accepted")  # lost with the connection
                proxy.holding = False
                agent.start()
                seq = accepted["seq"]
                wait_until(
                    lambda: [e for e in fleet.events_of("dev-ack", "director_accepted") if e.seq == seq],
                    30,
                    f"the swallowed event (seq {accepted['seq']}) after the restart:\n{agent.tail()}",
                )
                fleet.wait_state("dev-ack", "mlp-1.0.0", timeout=60)  # and the update goes on
            finally:
                if agent.proc is not None and agent.proc.poll() is None:
                    assert agent.stop() == 0, agent.tail()


class _FullDisk:
    """The outbox's connection, refusing writes while `full` (SQLite's "database or disk is full")."""

    def __init__(self, db: object) -> None:
        self.db = db
        self.full = True

    def execute(self, sql: str, *args: object) -> object:
        if self.full and sql.startswith("INSERT"):
            import sqlite3

            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


@pytest.mark.unit
def test_an_event_the_full_disk_refused_is_sent_from_memory_then_stored_when_room_returns() -> None:
    box = memory_outbox()
    box.put(b"stored")
    disk = _FullDisk(box._db)
    box._db = disk  # type: ignore[assignment]
    box.put(b"update_failed")  # the disk is full right when the update fails
    box.put(b"next")
    assert len(box) == 1  # only the first reached the database
    send = Sender(online=False)
    assert box.drain(send) == 0  # offline: kept (in memory), order kept
    send.online = True
    assert box.drain(send) == 3 and send.sent == [b"stored", b"update_failed", b"next"]
    # room again: later events are stored (durable) as usual
    disk.full = False
    box.put(b"later")
    assert len(box) == 2 and box.drain(send) == 1 and send.sent[-1] == b"later"


@pytest.mark.unit
def test_events_kept_in_memory_are_stored_in_order_once_the_disk_has_room() -> None:
    box = memory_outbox()
    disk = _FullDisk(box._db)
    box._db = disk  # type: ignore[assignment]
    box.put(b"a")
    box.put(b"b")
    disk.full = False
    send = Sender(online=False)
    box.drain(send)  # offline, but the drain makes them durable
    assert len(box) == 2
    send.online = True
    assert box.drain(send) == 2 and send.sent == [b"a", b"b"]
