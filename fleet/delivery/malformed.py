"""Malformed messages from devices: counted by kind, logged at most once per kind per interval.

Why a limit: any device login can publish garbage as fast as the broker takes it, and one
warning line per message let 3,000 garbage events write 3,016 lines, burying everything else
and filling the disk. So each kind (`report`, `event`, `request`) logs its first malformed
message at once, then at most one line per `interval_s`, which carries how many were
suppressed since the previous line. Nothing is lost for monitoring: `counts` feeds
`edgefleet_mqtt_malformed_total{kind}` at `/metrics` (`fleet/metrics.py`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from agent.logs import log_event

KINDS = ("report", "event", "request")
DEFAULT_INTERVAL_S = 60.0


class MalformedLog:
    """Counts malformed messages by kind and rate-limits their warning lines (thread-safe)."""

    def __init__(self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._counts: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, kind: str, error: str, **fields: object) -> None:
        """Count one malformed message of `kind`; log it unless this kind logged within the interval.

        The line is `publisher.bad_<kind>` with `error`, `fields` (device, topic), `suppressed`
        (lines skipped since the previous one) and `total` (all of this kind since start).
        """
        with self._lock:
            self._counts[kind] += 1
            now = self.clock()
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._suppressed[kind] += 1
                return
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
            total = self._counts[kind]
        log_event(self.logger, f"publisher.bad_{kind}", logging.WARNING, error=error[:300],
                  suppressed=suppressed, total=total, **fields)

    def counts(self) -> dict[str, int]:
        """Malformed messages per kind since start (every kind present, zero included)."""
        with self._lock:
            return {kind: self._counts.get(kind, 0) for kind in sorted({*KINDS, *self._counts})}
