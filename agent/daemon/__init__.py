"""The device daemon: wiring of transport, trust, lifecycle, serving and telemetry."""
