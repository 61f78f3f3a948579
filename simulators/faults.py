"""Fault injection: an MQTT-aware TCP proxy, a tiny disk, a skewed clock.

Why MQTT-aware: dropping or duplicating raw TCP bytes only breaks the framing and gets the
client disconnected, which is a disconnect test, not a lossy-link test. The proxy splits each
direction into MQTT packets (fixed header + remaining length) and applies faults to whole
PUBLISH packets: drop, duplicate (DUP flag set, as a broker redelivery would), corrupt the
payload (for topics containing `corrupt_topic`) or delay. A dropped QoS 1 PUBLISH is
acknowledged to the sender by the proxy, so the broker's in-flight window does not fill up
with messages the device will never ack: the message is simply lost, as if the device's
process had lost it, and the device's own timeouts and retries must recover. `cut_all`
closes every connection (no DISCONNECT: the broker publishes Last Wills), `block` keeps
named client ids offline until `unblock`.

Other faults live where they act: broker restarts in `simulators.broker.ManagedBroker`
(`restart`, `kill`), agent crashes by killing a swarm worker (`simulators.swarm`), a full
disk with `tiny_disk` (a size-limited tmpfs mount; needs root), clock skew with `SkewedClock`
passed to the agent's injectable clocks.

Errors: `tiny_disk` raises `fleet.errors.FleetMisuseError` when the mount is not possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.logs import log_event
from fleet.errors import FleetMisuseError

logger = logging.getLogger(__name__)

PUBLISH, PUBACK, CONNECT = 3, 4, 1
MAX_PACKET = 16 * 1024 * 1024


@dataclass
class FaultPlan:
    """What the proxy does to PUBLISH packets (probabilities per packet, seconds).

    `direction`: "down" (broker to device), "up" (device to broker) or "both".
    Change fields at any time; the proxy reads them per packet.
    """

    drop: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    corrupt_topic: str = ""
    delay_s: float = 0.0
    direction: str = "down"
    blocked: set[str] = field(default_factory=set)

    def applies(self, downstream: bool) -> bool:
        return self.direction == "both" or (self.direction == "down") == downstream


@dataclass
class FaultCounters:
    connections: int = 0
    refused: int = 0
    cut: int = 0
    dropped: int = 0
    duplicated: int = 0
    corrupted: int = 0
    forwarded: int = 0


async def read_packet(reader: asyncio.StreamReader) -> bytes:
    """One whole MQTT packet (fixed header included). Raises IncompleteReadError at EOF."""
    first = await reader.readexactly(1)
    header = bytearray(first)
    length, mult = 0, 1
    for _ in range(4):
        b = (await reader.readexactly(1))[0]
        header.append(b)
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    else:
        raise ValueError("malformed remaining length")
    if length > MAX_PACKET:
        raise ValueError(f"packet of {length} bytes over the proxy's limit")
    return bytes(header) + await reader.readexactly(length)


def _body_offset(packet: bytes) -> int:
    i = 1
    while packet[i] & 0x80:
        i += 1
    return i + 1


def parse_publish(packet: bytes) -> tuple[int, str, int | None, int]:
    """(qos, topic, packet id or None, payload offset) of a v5 PUBLISH packet."""
    qos = (packet[0] >> 1) & 0x03
    i = _body_offset(packet)
    tlen = int.from_bytes(packet[i : i + 2], "big")
    topic = packet[i + 2 : i + 2 + tlen].decode("utf-8", "replace")
    i += 2 + tlen
    pid = None
    if qos:
        pid = int.from_bytes(packet[i : i + 2], "big")
        i += 2
    plen, mult = 0, 1  # properties length (MQTT v5 varint)
    while True:
        b = packet[i]
        i += 1
        plen += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return qos, topic, pid, i + plen


def parse_connect_client_id(packet: bytes) -> str:
    """The client id of a v5 (or v3.1.1) CONNECT packet; "" when it cannot be read."""
    try:
        i = _body_offset(packet)
        plen = int.from_bytes(packet[i : i + 2], "big")
        i += 2 + plen
        level = packet[i]
        i += 4  # level, flags, keepalive
        if level == 5:
            n, mult = 0, 1
            while True:
                b = packet[i]
                i += 1
                n += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
            i += n
        cl = int.from_bytes(packet[i : i + 2], "big")
        return packet[i + 2 : i + 2 + cl].decode("utf-8", "replace")
    except IndexError:
        return ""


class FaultProxy:
    """A TCP proxy in front of the broker on its own asyncio thread (see the module docstring)."""

    def __init__(
        self, upstream_host: str, upstream_port: int, plan: FaultPlan | None = None, seed: int = 0
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.plan = plan or FaultPlan()
        self.counters = FaultCounters()
        self.rng = random.Random(seed)
        self.host = "127.0.0.1"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.StreamWriter, tuple[asyncio.StreamWriter, str]] = {}

    def start(self) -> FaultProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        fut.result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def _shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w, (u, _) in list(self._conns.items()):
                w.close()
                u.close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- controls (any thread) -----------------------------------------------------------
    def cut_all(self) -> int:
        """Close every proxied connection abruptly; returns how many were cut."""
        return asyncio.run_coroutine_threadsafe(self._cut(lambda cid: True), self._loop).result(10)

    def block(self, client_ids: set[str]) -> None:
        """Keep these clients offline: cut them now and refuse their reconnects."""
        self.plan.blocked |= set(client_ids)
        asyncio.run_coroutine_threadsafe(self._cut(lambda cid: cid in client_ids), self._loop).result(10)

    def unblock(self, client_ids: set[str] | None = None) -> None:
        self.plan.blocked -= set(client_ids) if client_ids is not None else set(self.plan.blocked)

    async def _cut(self, which: object) -> int:
        n = 0
        for w, (u, cid) in list(self._conns.items()):
            if which(cid):  # type: ignore[operator]
                w.transport.abort()
                u.transport.abort()
                n += 1
        self.counters.cut += n
        return n

    # --- proxying ------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        try:
            first = await read_packet(reader)
        except (asyncio.IncompleteReadError, ValueError, ConnectionError):
            writer.close()
            return
        cid = parse_connect_client_id(first) if first[0] >> 4 == CONNECT else ""
        if cid in self.plan.blocked:
            self.counters.refused += 1
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.counters.refused += 1
            writer.transport.abort()
            return
        self._conns[writer] = (up_w, cid)
        up_w.write(first)
        try:
            await asyncio.gather(
                self._pump(reader, up_w, writer, downstream=False),
                self._pump(up_r, writer, up_w, downstream=True),
            )
        finally:
            self._conns.pop(writer, None)
            writer.transport.abort()
            up_w.transport.abort()

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        back: asyncio.StreamWriter,
        downstream: bool,
    ) -> None:
        plan = self.plan
        try:
            while True:
                packet = await read_packet(src)
                if packet[0] >> 4 == PUBLISH and plan.applies(downstream):
                    packet = await self._fault(packet, dst, back)
                    if not packet:
                        continue
                dst.write(packet)
                await dst.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, OSError):
            dst.transport.abort()
            back.transport.abort()

    async def _fault(self, packet: bytes, dst: asyncio.StreamWriter, back: asyncio.StreamWriter) -> bytes:
        plan, rng = self.plan, self.rng
        if plan.delay_s > 0:
            await asyncio.sleep(plan.delay_s)
        qos, topic, pid, payload_at = parse_publish(packet)
        if plan.drop and rng.random() < plan.drop:
            self.counters.dropped += 1
            if qos == 1 and pid is not None:  # ack it so the sender's window does not fill up
                back.write(bytes([PUBACK << 4, 2]) + pid.to_bytes(2, "big"))
            return b""
        hit = plan.corrupt and plan.corrupt_topic in topic and rng.random() < plan.corrupt
        if hit and payload_at < len(packet):
            pos = rng.randrange(payload_at, len(packet))
            packet = packet[:pos] + bytes([packet[pos] ^ 0xFF]) + packet[pos + 1 :]
            self.counters.corrupted += 1
        if plan.duplicate and rng.random() < plan.duplicate:
            self.counters.duplicated += 1
            dst.write(packet)
            if qos:
                packet = bytes([packet[0] | 0x08]) + packet[1:]  # DUP flag on the redelivery
        self.counters.forwarded += 1
        return packet


class SkewedClock:
    """A UTC clock `offset` ahead (positive) or behind (negative) the real one."""

    def __init__(self, offset: timedelta) -> None:
        self.offset = offset

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@contextlib.contextmanager
def tiny_disk(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of `size_bytes` on `path` (a full disk for a device's state directory).

    Needs root and `mount` (the simulator's sandbox runs as root). Raises FleetMisuseError otherwise.
    """
    path.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={max(4096, size_bytes)}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:  # no `mount` on this system
        raise FleetMisuseError(f"cannot mount a {size_bytes} byte tmpfs on {path}: {exc}") from exc
    if res.returncode != 0:
        raise FleetMisuseError(f"cannot mount a {size_bytes} byte tmpfs on {path}: {res.stderr.strip()}")
    log_event(logger, "fault.tiny_disk", path=str(path), size_bytes=size_bytes)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


__all__ = [
    "FaultCounters",
    "FaultPlan",
    "FaultProxy",
    "SkewedClock",
    "parse_connect_client_id",
    "parse_publish",
    "read_packet",
    "tiny_disk",
]
