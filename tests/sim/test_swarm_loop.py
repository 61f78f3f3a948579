"""The swarm's selector loop: many paho clients on one thread behind the agent's Transport API."""

from __future__ import annotations

import random
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import FetchTimeoutError, MisuseError
from agent.transport import Message
from agent.transport.mqtt_config import MqttConfig
from simulators.broker import ManagedBroker
from simulators.swarm_loop import SwarmLoop, backoff_delay
from simulators.swarm_worker import raise_nofile_limit


def _wait(pred: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ManagedBroker]:
    with ManagedBroker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def loop() -> Iterator[SwarmLoop]:
    with SwarmLoop(tick_s=0.2, seed=1) as lp:
        yield lp


def _cfg(broker: ManagedBroker, cid: str) -> MqttConfig:
    return MqttConfig(
        port=broker.port, client_id=cid, keepalive_s=10, reconnect_min_s=0.05, reconnect_max_s=0.5
    )


@pytest.mark.unit
def test_backoff_is_jittered_capped_and_grows() -> None:
    rng = random.Random(3)
    early = [backoff_delay(0, 0.1, 5.0, rng) for _ in range(200)]
    late = [backoff_delay(20, 0.1, 5.0, rng) for _ in range(200)]
    assert all(0 <= d <= 0.1 for d in early)
    assert all(0 <= d <= 5.0 for d in late)
    assert max(late) > 1.0  # grew to the cap region
    assert len(set(early)) > 150  # jittered, not lock-step


@pytest.mark.unit
def test_nofile_limit_is_raised_but_never_lowered() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_nofile_limit(16) == soft
    wanted = min(soft + 64, hard)
    assert raise_nofile_limit(wanted) >= wanted


@pytest.mark.integration
def test_many_clients_share_one_loop_and_get_their_own_messages(
    broker: ManagedBroker, loop: SwarmLoop
) -> None:
    n = 150
    got: dict[int, list[bytes]] = {i: [] for i in range(n)}
    lock = threading.Lock()
    clients = []
    for i in range(n):
        t = loop.transport(_cfg(broker, f"dev-{i}"))

        def handler(m: Message, i: int = i) -> None:
            with lock:
                got[i].append(m.payload)

        t.subscribe(f"t/{i}", handler)
        t.connect(timeout=0)
        clients.append(t)
    assert _wait(lambda: loop.stats().connected == n)
    assert threading.active_count() < 10  # no thread per client
    # Retained: "connected" does not mean the SUBACK is back, and a message published before the
    # broker holds the subscription would otherwise be lost (a race under load, not a bug).
    for i, t in enumerate(clients):
        t.publish(f"t/{(i + 1) % n}", f"from-{i}".encode(), retain=True)
    assert _wait(lambda: all(got[i] for i in range(n)))
    assert got[0] == [f"from-{n - 1}".encode()]
    assert got[5] == [b"from-4"]


@pytest.mark.integration
def test_request_response_runs_on_the_loop(broker: ManagedBroker, loop: SwarmLoop) -> None:
    server = loop.transport(_cfg(broker, "server"))
    client = loop.transport(_cfg(broker, "client"))

    def answer(m: Message) -> None:
        assert m.response_topic is not None
        server.publish(m.response_topic, m.payload.upper(), correlation_data=m.correlation_data)

    server.subscribe("svc/req", answer)
    server.connect(timeout=10)
    client.connect(timeout=10)
    reply = client.request("svc/req", b"ping", response_topic="svc/resp/client", timeout=10)
    assert reply.payload == b"PING"
    with pytest.raises(FetchTimeoutError):
        client.request("svc/nobody", b"x", response_topic="svc/resp/client", timeout=0.5)


@pytest.mark.integration
def test_clients_reconnect_and_resubscribe_after_a_broker_restart(
    broker: ManagedBroker, loop: SwarmLoop
) -> None:
    n = 40
    seen: list[str] = []
    lock = threading.Lock()
    clients = []
    for i in range(n):
        t = loop.transport(_cfg(broker, f"r-{i}"))
        t.subscribe(f"after/{i}", lambda m: (lock.acquire(), seen.append(m.topic), lock.release()))
        t.connect(timeout=0)
        clients.append(t)
    assert _wait(lambda: loop.stats().connected == n)
    broker.restart(down_s=0.3)
    assert _wait(lambda: loop.stats().connected == n and loop.stats().connects >= 2 * n)
    assert loop.stats().connect_failures >= 0
    for i, t in enumerate(clients):
        t.publish(f"after/{i}", b"x")
    assert _wait(lambda: len(seen) == n)


@pytest.mark.integration
def test_a_dropped_connection_fires_the_last_will_and_comes_back(
    broker: ManagedBroker, loop: SwarmLoop
) -> None:
    watcher = loop.transport(_cfg(broker, "watcher"))
    wills: list[bytes] = []
    watcher.subscribe("status/+", lambda m: wills.append(m.payload))
    watcher.connect(timeout=10)
    dev = loop.transport(_cfg(broker, "victim"))
    dev.set_will("status/victim", b"offline", retain=False)
    dev.connect(timeout=10)
    dev.drop_connection()
    assert _wait(lambda: wills == [b"offline"])
    assert _wait(lambda: dev.connected and dev.connects == 2)


@pytest.mark.integration
def test_close_stops_reconnecting_and_refuses_reuse(broker: ManagedBroker, loop: SwarmLoop) -> None:
    t = loop.transport(_cfg(broker, "closer"))
    t.connect(timeout=10)
    t.close()
    assert not t.connected
    assert loop.stats().clients == 0
    time.sleep(0.3)
    assert t.connects == 1
    with pytest.raises(MisuseError):
        t.connect(timeout=1)


@pytest.mark.integration
def test_connect_times_out_without_a_broker_then_succeeds_when_it_appears(tmp_path: Path) -> None:
    b = ManagedBroker(tmp_path / "late")
    with SwarmLoop(tick_s=0.1) as lp:
        t = lp.transport(_cfg(b, "early"))
        with pytest.raises(Exception, match="not connected"):
            t.connect(timeout=0.3)
        with b:
            assert t.wait_connected(15)
        assert lp.stats().connect_failures >= 1
