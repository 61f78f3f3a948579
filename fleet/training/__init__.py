"""Retraining as a pluggable step: training jobs (lifecycle, trainer, bundle pipeline, rollout)."""
