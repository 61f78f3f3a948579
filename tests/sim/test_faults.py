"""Fault injection against a real Mosquitto: the MQTT-aware proxy, a tiny disk, a skewed clock."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.transport import Message
from agent.transport.mqtt_config import MqttConfig
from simulators.broker import ManagedBroker
from simulators.faults import FaultPlan, FaultProxy, SkewedClock, tiny_disk
from simulators.swarm_loop import LoopTransport, SwarmLoop


def _wait(pred: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedBroker]:
    with ManagedBroker(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
def proxy(broker: ManagedBroker) -> Iterator[FaultProxy]:
    with FaultProxy(broker.host, broker.port, seed=4) as p:
        yield p


@pytest.fixture
def loop() -> Iterator[SwarmLoop]:
    with SwarmLoop(tick_s=0.1) as lp:
        yield lp


def _client(loop: SwarmLoop, port: int, cid: str) -> LoopTransport:
    return loop.transport(
        MqttConfig(port=port, client_id=cid, keepalive_s=10, reconnect_min_s=0.05, reconnect_max_s=0.3)
    )


def _pair(
    loop: SwarmLoop, broker: ManagedBroker, proxy: FaultProxy, topic: str
) -> tuple[LoopTransport, list[Message]]:
    """A device behind the proxy subscribed to `topic`, and a direct publisher."""
    got: list[Message] = []
    lock = threading.Lock()
    dev = _client(loop, proxy.port, f"dev-{topic.split('/')[0]}")
    dev.subscribe(topic, lambda m: (lock.acquire(), got.append(m), lock.release()))
    dev.connect(timeout=10)
    pub = _client(loop, broker.port, f"pub-{topic.split('/')[0]}")
    pub.connect(timeout=10)
    # the subscription is in place once a probe gets through (CONNACK comes before SUBACK)
    probe = topic.replace("#", "probe")
    assert _wait(lambda: (pub.publish(probe, b"probe"), time.sleep(0.1), bool(got))[2])
    time.sleep(0.2)
    got.clear()
    return pub, got


@pytest.mark.integration
def test_dropped_publishes_are_lost_but_do_not_stall_the_link(
    broker: ManagedBroker, proxy: FaultProxy, loop: SwarmLoop
) -> None:
    pub, got = _pair(loop, broker, proxy, "drop/x")
    proxy.plan.drop = 1.0
    for i in range(150):  # more than the broker's in-flight window
        pub.publish("drop/x", str(i).encode())
    assert _wait(lambda: proxy.counters.dropped == 150)
    assert got == []
    proxy.plan.drop = 0.0
    pub.publish("drop/x", b"after")
    assert _wait(lambda: [m.payload for m in got] == [b"after"])


@pytest.mark.integration
def test_duplicates_arrive_twice(broker: ManagedBroker, proxy: FaultProxy, loop: SwarmLoop) -> None:
    pub, got = _pair(loop, broker, proxy, "dup/x")
    proxy.plan.duplicate = 1.0
    pub.publish("dup/x", b"once")
    assert _wait(lambda: len(got) == 2)
    assert [m.payload for m in got] == [b"once", b"once"]


@pytest.mark.integration
def test_corruption_hits_only_the_chosen_topics(
    broker: ManagedBroker, proxy: FaultProxy, loop: SwarmLoop
) -> None:
    pub, got = _pair(loop, broker, proxy, "cor/#")
    proxy.plan.corrupt, proxy.plan.corrupt_topic = 1.0, "/chunks"
    payload = bytes(range(256)) * 4
    pub.publish("cor/chunks", payload)
    pub.publish("cor/other", payload)
    assert _wait(lambda: len(got) == 2)
    by_topic = {m.topic: m.payload for m in got}
    assert by_topic["cor/other"] == payload
    assert by_topic["cor/chunks"] != payload and len(by_topic["cor/chunks"]) == len(payload)
    assert proxy.counters.corrupted == 1


@pytest.mark.integration
def test_cut_and_block_keep_devices_offline_until_released(
    broker: ManagedBroker, proxy: FaultProxy, loop: SwarmLoop
) -> None:
    a, b = _client(loop, proxy.port, "cut-a"), _client(loop, proxy.port, "cut-b")
    a.connect(timeout=10)
    b.connect(timeout=10)
    assert proxy.cut_all() == 2
    assert _wait(lambda: a.connects == 2 and b.connects == 2 and a.connected and b.connected)
    proxy.block({"cut-a"})
    assert _wait(lambda: not a.connected)
    time.sleep(0.5)
    assert not a.connected and b.connected
    assert proxy.counters.refused >= 1
    proxy.unblock({"cut-a"})
    assert _wait(lambda: a.connected)


@pytest.mark.integration
def test_a_tiny_disk_fills_up(tmp_path: Path) -> None:
    with tiny_disk(tmp_path / "state", 64 * 1024) as d:
        (d / "small").write_bytes(b"x" * 1000)
        with pytest.raises(OSError) as exc:
            (d / "big").write_bytes(b"x" * 256 * 1024)
        assert exc.value.errno == errno.ENOSPC
    assert not (tmp_path / "state" / "small").exists()  # unmounted


@pytest.mark.unit
def test_skewed_clock() -> None:
    ahead = SkewedClock(timedelta(hours=2))()
    assert ahead - datetime.now(UTC) > timedelta(hours=1, minutes=59)
    plan = FaultPlan(direction="up")
    assert plan.applies(downstream=False) and not plan.applies(downstream=True)
