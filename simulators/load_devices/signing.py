"""Load devices sign like agents (issue 14), cheaply: one Ed25519 signature per message.

Keys are derived from the device ids (`simulators.device_keys`), so `fleet_setup.register_devices`
can register them and the load loop, possibly in another process, sign without a key file.
Counters start at the wall clock in microseconds (a run started later signs above an earlier
one) and increase by one per message; each message is signed when it is sent, so a resend after
a reconnect carries a fresh counter. Measured cost: see docs/benchmarks.md (*Signed device reports*).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract.report_auth import HEADER, signed_bytes
from simulators.device_keys import sim_device_key


class LoadSigner:
    """Signs every load device's messages; one counter per device."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._start = int(clock() * 1_000_000)
        self._keys: dict[str, Ed25519PrivateKey] = {}
        self._counters: dict[str, int] = {}

    def header(self, device_id: str, kind: str, payload: bytes) -> str:
        key = self._keys.get(device_id)
        if key is None:
            key = self._keys[device_id] = sim_device_key(device_id)
        counter = self._counters.get(device_id, self._start) + 1
        self._counters[device_id] = counter
        sig = key.sign(signed_bytes(kind, device_id, counter, payload))
        return f"{counter}.{base64.b64encode(sig).decode()}"

    def properties(self, device_id: str, topic: str, payload: bytes) -> Properties:
        """PUBLISH properties carrying the signature; the kind is the topic's last level."""
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [(HEADER, self.header(device_id, topic.rsplit("/", 1)[-1], payload))]
        return props
