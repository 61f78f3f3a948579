"""Simulated device swarm, data generators, fault injection and scenarios."""
