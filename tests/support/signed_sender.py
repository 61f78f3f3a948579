"""Devices' side of the ingest fault tests: signed QoS-1 publishes from one raw paho client,
as agents' outboxes send them, and the waiting those tests do between a fault and a count."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker
from tests.support.report_signing import DeviceKey

#: One message: device id, topic kind (`telemetry`, `events`), payload.
Item = tuple[str, str, bytes]


class SignedSender:
    """A connected MQTT v5 client publishing each item signed with its device's key."""

    def __init__(self, broker: Broker, prefix: str, keys: dict[str, DeviceKey], name: str) -> None:
        self.prefix, self.keys = prefix, keys
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{secrets.token_hex(4)}",
                                  protocol=mqtt.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, item: Item) -> mqtt.MQTTMessageInfo:
        device, kind, payload = item
        return self.client.publish(f"{self.prefix}/v1/devices/{device}/{kind}", payload, qos=1,
                                   properties=self.keys[device].paho_properties(kind, payload))

    def stream(self, items: Sequence[Item], pause_s: float = 0.0) -> threading.Thread:
        """A (not yet started) thread sending `items` one at a time, each acknowledged by the
        broker before the next, so when it ends the devices' outboxes are empty."""

        def send() -> None:
            for item in items:
                self.publish(item).wait_for_publish(30)
                if pause_s:
                    time.sleep(pause_s)

        return threading.Thread(target=send, daemon=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_until(done: Callable[[], bool], timeout_s: float, step_s: float = 0.2) -> bool:
    """Poll `done` until it holds or `timeout_s` passed; returns its last answer."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)
    return True
