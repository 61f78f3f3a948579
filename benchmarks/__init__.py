"""Benchmarks: `python -m benchmarks [NAME ...] --json FILE`.

Each module `benchmarks/bench_<name>.py` defines `NAME: str`, `DESCRIPTION: str` and
`run() -> dict[str, float]` returning metrics keyed by name. Every timing is reported next
to a baseline measured in the same run (the machine is noisy).
"""
