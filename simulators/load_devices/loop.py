"""`LoadFleet`: many load devices' MQTT v5 clients on one thread and one `selectors` loop.

Why not a thread per client (paho's `loop_start`): ten thousand threads cost more memory and
scheduling than the devices are worth. Here each paho client's socket is registered with one
selector (paho's `on_socket_open` / `on_socket_close` hooks); readable sockets get `loop_read`,
clients with queued output `loop_write`, and every client `loop_misc` once a second (keepalive,
reconnect). Connections ramp up in batches so CONNACKs are read while others still connect.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import selectors
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract.protocol import Topics
from agent.contract.telemetry import TelemetryReport
from simulators.load_devices.device import LoadDevice, Outgoing
from simulators.load_devices.signing import LoadSigner

logger = logging.getLogger("edgefleet.sim.load")


@dataclass
class LoadStats:
    connected: int = 0
    documents: int = 0
    committed: int = 0
    published: int = 0
    acked: int = 0
    reconnects: int = 0


@dataclass
class _Slot:
    index: int
    device: LoadDevice
    client: mqtt.Client
    mids: dict[int, int] = field(default_factory=dict)  # paho mid -> outbox seq
    online: bool = False
    next_telemetry: float = 0.0


class LoadFleet:
    """`devices` load devices on the broker at `host:port`; `start()` runs the loop in a thread."""

    def __init__(self, host: str, port: int, prefix: str, device_ids: Sequence[str], active: str | None,
                 install_s: float = 0.2, telemetry_s: float = 0.0, template: TelemetryReport | None = None,
                 clock: Callable[[], float] = time.time, connect_batch: int = 250,
                 keepalive_s: int = 120) -> None:
        self.host, self.port = host, port
        self.topics = Topics(prefix)
        self.clock = clock
        self.telemetry_s = telemetry_s if template is not None else 0.0
        self.template = template
        self.connect_batch = connect_batch
        self.keepalive_s = keepalive_s
        self.stats = LoadStats()
        self.signer = LoadSigner(clock)  # every message signed as the device (issue 14)
        self._sel = selectors.DefaultSelector()
        self._slots = [self._slot(i, LoadDevice(dev, self.topics, active, install_s))
                       for i, dev in enumerate(device_ids)]
        self._timers: list[tuple[float, int]] = []  # (commit_at, slot index)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def devices(self) -> list[LoadDevice]:
        return [s.device for s in self._slots]

    # -- one client ---------------------------------------------------------------------------
    def _slot(self, index: int, device: LoadDevice) -> _Slot:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=mqtt.MQTTv5)
        slot = _Slot(index, device, client)
        client.user_data_set(slot)
        client.on_socket_open = self._register
        client.on_socket_close = self._unregister
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return slot

    def _unregister(self, client: mqtt.Client, slot: _Slot, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # already gone
            self._sel.unregister(sock)

    def _register(self, client: mqtt.Client, slot: _Slot, sock: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, slot)

    def _send(self, slot: _Slot, out: Outgoing) -> None:
        if not slot.online:
            return  # events and telemetry stay in the outbox; reported is re-sent on connect
        props = self.signer.properties(slot.device.device_id, out.topic, out.payload)
        info = slot.client.publish(out.topic, out.payload, qos=1, retain=out.retain, properties=props)
        self.stats.published += 1
        if out.seq is not None:
            slot.mids[info.mid] = out.seq

    def _on_connect(self, client: mqtt.Client, slot: _Slot, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return
        slot.online = True
        self.stats.connected += 1
        client.subscribe(self.topics.desired(slot.device.device_id), qos=1)
        now = self.clock()
        self._send(slot, slot.device.reported(now))
        for out in list(slot.device.outbox.values()):  # at least once: what was never acknowledged
            self._send(slot, out)

    def _on_disconnect(self, client: mqtt.Client, slot: _Slot, flags: Any, rc: Any, props: Any) -> None:
        if slot.online:
            self.stats.connected -= 1
        slot.online = False
        slot.mids.clear()

    def _on_message(self, client: mqtt.Client, slot: _Slot, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        self.stats.documents += 1
        for out in slot.device.on_director(bytes(msg.payload), self.clock()):
            self._send(slot, out)
        if slot.device.commit_at is not None:
            heapq.heappush(self._timers, (slot.device.commit_at, slot.index))

    def _on_publish(self, client: mqtt.Client, slot: _Slot, mid: int, rc: Any, props: Any) -> None:
        seq = slot.mids.pop(mid, None)
        if seq is not None:
            slot.device.acked(seq)
            self.stats.acked += 1

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="load-devices", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.stats.connected < len(self._slots) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.stats.connected >= len(self._slots)

    def _run(self) -> None:
        pending = list(range(len(self._slots)))
        pending.reverse()
        last_misc = 0.0
        while not self._stop.is_set():
            for _ in range(min(self.connect_batch, len(pending))):
                slot = self._slots[pending.pop()]
                try:
                    slot.client.connect(self.host, self.port, keepalive=self.keepalive_s)
                except OSError as exc:
                    logger.warning("load device %s cannot connect: %s", slot.device.device_id, exc)
            for key, _ in self._sel.select(timeout=0.05):
                slot = key.data
                slot.client.loop_read()
                if slot.client.want_write():
                    slot.client.loop_write()
            now = self.clock()
            while self._timers and self._timers[0][0] <= now:
                _, i = heapq.heappop(self._timers)
                slot = self._slots[i]
                for out in slot.device.due(now):
                    self._send(slot, out)
                if slot.device.commit_at is None and slot.device.applied:
                    self.stats.committed += 1
            if self.telemetry_s > 0 and self.template is not None:
                self._telemetry(now)
            if time.monotonic() - last_misc >= 1.0:
                last_misc = time.monotonic()
                for slot in self._slots:
                    slot.client.loop_misc()
                    if slot.client.want_write():
                        slot.client.loop_write()
        for slot in self._slots:
            slot.client.disconnect()
            slot.client.loop_write()

    def _telemetry(self, now: float) -> None:
        assert self.template is not None
        for slot in self._slots:
            if slot.online and now >= slot.next_telemetry:
                slot.next_telemetry = now + self.telemetry_s
                self._send(slot, slot.device.telemetry(self.template, now, self.telemetry_s))
