"""The wire contract shared by agent and fleet: bundle manifest and format, director
document, protocol messages and telemetry encoding. Pure data and pure functions only."""
