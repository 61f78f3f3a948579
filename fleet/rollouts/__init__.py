"""Rollouts: the controller, strategies, gates, durable records and A/B experiments."""
