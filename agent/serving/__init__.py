"""Local serving: the model holder, the inference API and its servers and client, scoring files."""
