"""Run benchmarks by name, print a table and write one JSON object of metrics."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import time
from pathlib import Path
from types import ModuleType

import benchmarks


def discover() -> dict[str, ModuleType]:
    """Map benchmark name to module for every `benchmarks/bench_*.py`."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name.startswith("bench_"):
            mod = importlib.import_module(f"benchmarks.{info.name}")
            found[mod.NAME] = mod
    return found


def main(argv: list[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(available)}")
    parser.add_argument("--json", type=Path, help="write all metrics as one JSON object to this file")
    parser.add_argument("--list", action="store_true", help="list benchmarks and exit")
    parser.add_argument("--database", default=None,
                        help="database URL for the benchmarks that take one (rollout_scale, ingest_scale, "
                             "fleet_scale): sqlite:///path or postgresql://...")
    args = parser.parse_args(argv)
    if args.list:
        for name, mod in available.items():
            print(f"{name:20s} {mod.DESCRIPTION}")
        return 0
    unknown = [n for n in args.names if n not in available]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(available)}")
    metrics: dict[str, float] = {}
    for name in args.names or list(available):
        print(f"== {name}: {available[name].DESCRIPTION}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        run = available[name].run
        takes_db = "database" in inspect.signature(run).parameters
        result = run(database=args.database) if takes_db else run()
        print(f"   done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        metrics.update(result)
    width = max((len(k) for k in metrics), default=10)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:,.4g}")
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
