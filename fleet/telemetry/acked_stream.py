"""Telemetry on an MQTT connection of its own, each report acknowledged after the flush that stored it.

The stream itself is `fleet.delivery.acked_stream.AckedStream` (shared with the events stream,
`fleet/delivery/event_stream.py`); this module fixes telemetry's share of it. The client id is
`<fleet client id>-telemetry` (stable per slot: a worker SIGKILLed is redelivered what it held
when it starts again), and a report is acknowledged once a `TelemetryStore.flush` that began
after it was ingested has committed. Flushes come at 1,000 held reports (half the 2,000 window)
or when the oldest has waited 1 s: each flush has a fixed cost, several statements under a lock
the workers share, so fewer, larger flushes go faster.

The share group is `<ingest group>-telemetry`, not the ingest group: a fleet client of an older
release still has a telemetry subscription in its persistent session in the ingest group, and
the broker would hand that session a share of the reports, which it would drop.
`retire_legacy_subscription` unsubscribes it on the publisher's connection.
"""

from __future__ import annotations

from fleet.delivery.acked_stream import AckedStream, StreamSettings, retire_legacy_subscription

__all__ = ["StreamSettings", "TelemetryStream", "retire_legacy_subscription"]


class TelemetryStream(AckedStream):
    """The telemetry stream: `ingest(device, payload)` is the store's ingest, `flush` its flush."""

    name = "telemetry-stream"
    kind = "telemetry"
