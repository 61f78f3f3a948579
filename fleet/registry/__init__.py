"""Model registry: versions, bundle build, quantization, profiles, publish, MLflow import."""
