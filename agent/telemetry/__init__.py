"""Device-side telemetry: the per-interval sketch and the store-and-forward queue.

The report format and its encoding live in `agent.contract.telemetry` (shared with the fleet).
"""

from agent.telemetry.queue import QueueConfig, ReportQueue
from agent.telemetry.sketch import TelemetrySketch, process_resources

__all__ = ["QueueConfig", "ReportQueue", "TelemetrySketch", "process_resources"]
