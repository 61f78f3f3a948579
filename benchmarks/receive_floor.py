"""The MQTT client's own cost: a bare paho-mqtt subscriber that receives telemetry and drops it.

`ingest_scale` runs this as a separate process (`python -m benchmarks.receive_floor HOST PORT N
[--decode]`) on a broker of the same kind as the workers', so its rate is what one Python
process can take off the broker on this machine before doing any ingest work: MQTT v5, the
workers' Receive Maximum, QoS 1 acknowledged by paho on arrival. With `--decode` it also calls
`decode_report` on each payload (the receive + decode floor). It prints `ready` once its
subscription is acknowledged, then one JSON line: the rate between 10 % and 90 % of `N`
reports, how many arrived and the CPU seconds it used from the first report to the last.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract.telemetry_codec import decode_report

TOPIC = "edgefleet/v1/devices/+/telemetry"
RECEIVE_MAXIMUM = 2000  # fleet/telemetry/acked_stream.py StreamSettings.window
IDLE_S = 30.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.receive_floor")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--decode", action="store_true")
    args = parser.parse_args(argv)
    n, decode = args.count, args.decode
    done = threading.Event()
    marks: dict[str, float] = {}
    got = [0]

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        if decode:
            decode_report(bytes(msg.payload))
        got[0] += 1
        count = got[0]
        if count == 1:
            marks["cpu0"], marks["t0"] = _cpu_s(), time.monotonic()
        if count == max(1, n // 10):
            marks["lo"], marks["lo_n"] = time.monotonic(), count
        if count == max(1, (9 * n) // 10):
            marks["hi"], marks["hi_n"] = time.monotonic(), count
        if count >= n:
            marks["cpu1"], marks["t1"] = _cpu_s(), time.monotonic()
            done.set()

    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"receive-floor-{'d' if decode else 'r'}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_connect = lambda c, *_a: c.subscribe(TOPIC, qos=1)
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    client.connect(args.host, args.port, properties=props)
    client.loop_start()
    try:
        if not subscribed.wait(30):
            print(json.dumps({"error": "not subscribed"}), flush=True)
            return 1
        print("ready", flush=True)
        last, progress = 0, time.monotonic()
        while not done.wait(0.2):
            if got[0] != last:
                last, progress = got[0], time.monotonic()
            elif time.monotonic() - progress > IDLE_S:
                break
    finally:
        client.loop_stop()
        client.disconnect()
    rate = (marks["hi_n"] - marks["lo_n"]) / max(1e-9, marks["hi"] - marks["lo"]) if "hi" in marks else 0.0
    cpu_s = marks.get("cpu1", _cpu_s()) - marks.get("cpu0", 0.0)
    wall_s = marks.get("t1", time.monotonic()) - marks.get("t0", 0.0)
    print(json.dumps({"rate": rate, "received": got[0], "cpu_s": cpu_s, "wall_s": wall_s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
