"""Telemetry: ingest, drift statistics, alerts and the drift monitor."""
