"""edgefleet fleet service: registry, bundle pipeline, TUF repository, rollouts, telemetry."""
