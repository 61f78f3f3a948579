"""Load devices: thousands of lightweight simulated devices per process, for fleet-side scale.

They are *load devices*, never agents: no model runs, no bundle is downloaded or verified (TUF
is skipped), a director document's signature is not checked. What they do is what the fleet
sees of an agent: they parse each director document (`agent.contract.director`), walk the
state transitions an agent reports (reported state downloading -> probation -> idle on the
new bundle, events `director_accepted` and `committed`), send telemetry reports built with the
agent's encoders, and deliver events and reports at least once from an in-memory outbox with
sequence numbers (resent after a reconnect, deduplicated by the fleet). The real-agent swarm
(`simulators/swarm.py`) stays the end-to-end truth; these measure the fleet.

`device.py` holds one device's state and reactions (no I/O); `loop.py` runs many devices'
MQTT v5 clients on one selector loop (paho's `loop_read` / `loop_write` / `loop_misc`).
"""
