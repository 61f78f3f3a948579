"""The fleet's `edgefleet` command groups (bundle, fleet, telemetry, keys, repo)."""
