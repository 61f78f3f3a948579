"""Opt-in data collection: the operator's requests, the signed policy in director documents,
and the dataset chunks admitted from devices under it (issue 13, docs/telemetry.md)."""
