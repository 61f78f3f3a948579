"""`--database URL` for the scale benchmarks: which database a benchmark's fleet runs on.

Today the fleet's database layer opens SQLite files (`sqlite:///path` or no URL: a file in the
benchmark's temporary directory). A `postgresql://` URL is accepted by the option so the
commands stay the same once the PostgreSQL backend lands; until then it is refused with one
sentence rather than silently measuring SQLite. `probe_postgres()` tells whether a server
answers on 127.0.0.1:5432 (the metric names say which backend was measured).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class BenchDatabase:
    backend: str  # "sqlite" | "pg"
    path: Path | None  # the SQLite file (None: make one in the benchmark's temporary directory)
    url: str | None


def parse_database(url: str | None) -> BenchDatabase:
    """`sqlite:///abs/path`, `postgresql://...` or None; raises SystemExit with a sentence."""
    if url is None:
        return BenchDatabase("sqlite", None, None)
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return BenchDatabase("sqlite", Path(parts.path) if parts.path else None, url)
    if parts.scheme.startswith("postgres"):
        raise SystemExit(f"{url}: this fleet build has no PostgreSQL backend yet (fleet/db opens SQLite); "
                         "run without --database to measure SQLite")
    raise SystemExit(f"--database {url!r}: give sqlite:///path or postgresql://...")


def probe_postgres(host: str = "127.0.0.1", port: int = 5432) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
