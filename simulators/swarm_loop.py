"""One selector event loop driving many paho clients, each exposed as the agent's `Transport`.

Why: paho's own network loop uses select() and one thread per client, which stops at about
340 clients per process; paho's external-loop API (`on_socket_open`, `on_socket_close`,
`on_socket_register_write`, `on_socket_unregister_write` with `loop_read` / `loop_write` /
`loop_misc`) lets one epoll loop hold thousands. Clients driven that way never reconnect by
themselves, so the loop does it: after a lost connection (or a CONNACK that does not come in
time) it retries with full-jitter capped exponential backoff, the same policy as the agent's
own `MqttTransport` supervisor.

`LoopTransport` subclasses `agent.transport.mqtt_client.MqttTransport` and replaces only the
connection machinery (supervisor thread, paho network thread): subscriptions, request/response,
size checks and message dispatch are the agent's own code, so the real agent runs on it.
Handlers run on the loop thread and must not block (the same rule as on paho's thread).

Errors: `LoopTransport.connect` raises `agent.errors.TransportError` when no CONNACK arrives in
time (the loop keeps trying) and `MisuseError` after `close`; `SwarmLoop.transport` raises
`MisuseError` when the loop is stopped.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import MisuseError, TransportError
from agent.logs import log_event
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig

logger = logging.getLogger(__name__)


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap_s, base_s * (2 ** min(attempt, 30))))


@dataclass(frozen=True)
class LoopStats:
    clients: int
    connected: int
    connects: int  # successful CONNACKs, reconnects included
    connect_failures: int  # TCP connects refused / timed out


class LoopTransport(MqttTransport):
    """`Transport` on a shared `SwarmLoop` (see the module docstring)."""

    def __init__(self, config: MqttConfig, loop: SwarmLoop) -> None:
        super().__init__(config)
        self._loop = loop
        self._sock: socket.socket | None = None
        self._attempt = 0
        self._first = True
        self._started = False
        self._reconnect_due = False
        self._socket_opened_at = 0.0
        c = self._client
        # paho's TCP connect blocks the loop thread: keep it short so that a broker with a
        # full accept backlog cannot stall every other client for seconds per attempt.
        c.connect_timeout = min(2.0, config.connect_timeout_s)
        c.on_socket_open = self._on_sock_open
        c.on_socket_close = self._on_sock_close
        c.on_socket_register_write = self._on_reg_write
        c.on_socket_unregister_write = self._on_unreg_write

    # --- the Transport connection API ------------------------------------------------------
    def connect(self, timeout: float | None = None) -> None:
        """Start connecting on the loop (idempotent); wait up to `timeout` s (0 = do not wait).

        Raises `MisuseError` (closed) or `TransportError` (no CONNACK in time, refused).
        """
        if self._closing.is_set():
            raise MisuseError("transport was closed")
        if not self._started:
            self._started = True
            self._loop.call_soon(self._attempt_connect)
        wait = self.config.connect_timeout_s if timeout is None else timeout
        if wait <= 0:
            return
        if not self._connected.wait(wait):
            why = f" (last refusal: {self._last_failure})" if self._last_failure else ""
            raise TransportError(
                f"not connected to {self.config.host}:{self.config.port} within {wait:.1f}s{why}"
            )

    def close(self) -> None:
        """Disconnect cleanly (no Last Will), stop reconnecting, leave the loop."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._lost.set()
        done = threading.Event()

        def _close() -> None:
            with contextlib.suppress(OSError, ValueError):
                self._client.disconnect()
                self._client.loop_write()
            if self._sock is not None:  # DISCONNECT could not be written: drop the socket
                self._loop.forget_socket(self._sock)
                with contextlib.suppress(OSError):
                    self._sock.close()
                self._sock = None
            self._loop.remove(self)
            done.set()

        if self._loop.on_loop_thread():
            _close()
        else:
            self._loop.call_soon(_close)
            done.wait(5.0)
        self._connected.clear()
        self._pending.cancel_all()

    def drop_connection(self) -> None:
        """Cut the TCP connection without DISCONNECT (the broker publishes the Last Will); reconnects."""

        def _drop() -> None:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

        self._loop.call_soon(_drop)

    # --- driven by the loop thread -----------------------------------------------------------
    def _attempt_connect(self) -> None:
        self._reconnect_due = False
        if self._closing.is_set() or self._sock is not None:
            return  # closed, or an attempt is in progress (its CONNACK timeout covers it)
        try:
            if self._first:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.config.session_expiry_s
                self._client.connect(
                    self.config.host,
                    self.config.port,
                    keepalive=self.config.keepalive_s,
                    clean_start=self.config.clean_start,
                    properties=props,
                )
                self._first = False
            else:
                self._client.reconnect()
        except (OSError, ValueError) as exc:
            self._loop.connect_failures += 1
            log_event(
                logger,
                "swarm.connect_failed",
                level=logging.DEBUG,
                client=self.config.client_id,
                error=str(exc),
            )
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._closing.is_set() or self._reconnect_due:
            return
        self._reconnect_due = True
        delay = backoff_delay(
            self._attempt, self.config.reconnect_min_s, self.config.reconnect_max_s, self._loop.rng
        )
        self._attempt += 1
        self._loop.call_later(delay, self._attempt_connect)

    def _tick(self, now: float) -> None:
        """Keepalive and CONNACK timeout; re-arms write interest paho may have missed, and
        revives a client that lost its socket without a reconnect being scheduled."""
        if self._sock is None:
            if self._started and not self._reconnect_due and not self._closing.is_set():
                self._schedule_reconnect()
            return
        self._client.loop_misc()
        if self._sock is None:
            return
        if not self._connected.is_set() and now - self._socket_opened_at > self.config.connect_timeout_s:
            log_event(logger, "swarm.connack_timeout", level=logging.DEBUG, client=self.config.client_id)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            return
        if self._client.want_write():
            self._loop.want_write(self._sock, True)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        super()._on_connect(client, userdata, flags, rc, props)
        if not rc.is_failure:
            self._attempt = 0

    # --- paho socket callbacks ---------------------------------------------------------------
    def _on_sock_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._sock = sock
        self._socket_opened_at = time.monotonic()
        self._loop.add_socket(sock, self)

    def _on_sock_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.forget_socket(sock)
        self._sock = None
        self._connected.clear()
        self._schedule_reconnect_threadsafe()

    def _on_reg_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.want_write(sock, True)

    def _on_unreg_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.want_write(sock, False)

    def _schedule_reconnect_threadsafe(self) -> None:
        if self._loop.on_loop_thread():
            self._schedule_reconnect()
        else:
            self._loop.call_soon(self._schedule_reconnect)


class SwarmLoop:
    """An epoll loop thread for many `LoopTransport`s, with call_soon / call_later."""

    def __init__(self, tick_s: float = 0.5, seed: int | None = None, name: str = "swarm-loop") -> None:
        self.tick_s = tick_s
        self.rng = random.Random(seed)
        self.connect_failures = 0
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._clients: dict[str, LoopTransport] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread_id: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> SwarmLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every client, then stop the loop thread."""
        for t in list(self._clients.values()):
            t.close()
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> SwarmLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def transport(self, config: MqttConfig) -> LoopTransport:
        """A new client on this loop (not yet connecting: call `connect`).

        Raises `MisuseError` when the loop is stopped.
        """
        if self._stop.is_set():
            raise MisuseError("the swarm loop is stopped")
        t = LoopTransport(config, self)
        self._clients[config.client_id] = t
        return t

    def remove(self, transport: LoopTransport) -> None:
        self._clients.pop(transport.config.client_id, None)

    def stats(self) -> LoopStats:
        clients = list(self._clients.values())
        return LoopStats(
            clients=len(clients),
            connected=sum(1 for c in clients if c.connected),
            connects=sum(c.connects for c in clients),
            connect_failures=self.connect_failures,
        )

    # --- scheduling (any thread) ---------------------------------------------------------------
    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        if not self.on_loop_thread():
            self._wake()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        when = time.monotonic() + delay_s
        if self.on_loop_thread():
            heapq.heappush(self._timers, (when, next(self._seq), fn))
        else:
            self.call_soon(lambda: heapq.heappush(self._timers, (when, next(self._seq), fn)))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # --- socket registry (paho callbacks) ------------------------------------------------------
    def add_socket(self, sock: Any, transport: LoopTransport) -> None:
        if self.on_loop_thread():
            self._sel.register(sock, selectors.EVENT_READ, transport)
        else:
            self.call_soon(lambda: self.add_socket(sock, transport))

    def forget_socket(self, sock: Any) -> None:
        if self.on_loop_thread():
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(sock)
        else:
            self.call_soon(lambda: self.forget_socket(sock))

    def want_write(self, sock: Any, on: bool) -> None:
        if not self.on_loop_thread():
            self.call_soon(lambda: self.want_write(sock, on))
            return
        try:
            key = self._sel.get_key(sock)
        except (KeyError, ValueError):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        if key.events != events:
            self._sel.modify(sock, events, key.data)

    # --- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        next_tick = time.monotonic() + self.tick_s
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = next_tick - now
            if self._timers:
                timeout = min(timeout, self._timers[0][0] - now)
            if self._calls:
                timeout = 0
            try:
                ready = self._sel.select(max(0.0, timeout))
            except OSError:  # pragma: no cover - selector closed during stop
                break
            for key, mask in ready:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                self._service(key.data, mask)
            self._run_calls()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                self._guard(fn)
            if now >= next_tick:
                next_tick = now + self.tick_s
                tick_at = now
                for t in list(self._clients.values()):
                    try:
                        t._tick(tick_at)
                    except Exception:
                        logger.exception("swarm loop tick failed")

    def _service(self, t: LoopTransport, mask: int) -> None:
        client = t._client
        if mask & selectors.EVENT_READ:
            self._guard(client.loop_read)
        if mask & selectors.EVENT_WRITE and t._sock is not None:
            self._guard(client.loop_write)

    def _run_calls(self) -> None:
        for _ in range(len(self._calls)):
            self._guard(self._calls.popleft())

    @staticmethod
    def _guard(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # one client's failure must not stop the loop for the others
            logger.exception("swarm loop callback failed")
