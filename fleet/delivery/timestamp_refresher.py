"""`TimestampRefresher`: re-signs the TUF `timestamp.json` well before it expires, and publishes it.

Why a component of its own: a repository nobody touches would otherwise let its timestamp
expire after a day, and every device would then refuse every update (TUF treats expired
metadata as an attack). It runs as a job of `fleet.periodic.PeriodicRunner`; with several
controllers only the lease holder refreshes (`active`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.logs import log_event
from fleet.delivery.publisher import Publisher
from fleet.errors import FleetError
from fleet.periodic import PeriodicRunner
from fleet.registry.publish import REPO_LOCK
from fleet.trust.repository import Repository

logger = logging.getLogger("edgefleet.fleet.components")


class TimestampRefresher:
    """Re-sign the TUF timestamp every `interval_s` (job `timestamp-refresher` of its runner);
    with several controllers, only the leader does (`active`)."""

    name = "timestamp-refresher"

    def __init__(self, repo: Repository, interval_s: float, publisher: Publisher | None = None,
                 active: Callable[[], bool] = lambda: True) -> None:
        self.repo = repo
        self.interval_s = interval_s
        self.publisher = publisher
        self.active = active
        self.refreshed = 0
        # a failed refresh is logged and retried next period: an expired timestamp freezes the fleet
        self._runner = PeriodicRunner(logger)
        self._runner.add(self.name, lambda: self.refresh() if self.active() else None, interval_s)

    def refresh(self) -> int:
        """One refresh (and publish); returns the new timestamp version.

        Raises what `Repository.refresh_timestamp` raises (`FleetMisuseError`: not initialised,
        keys missing); a failed publish is logged, not raised."""
        with REPO_LOCK:
            version = self.repo.refresh_timestamp()
        self.refreshed += 1
        if self.publisher is not None:
            try:
                self.publisher.publish_metadata("timestamp.json")
            except FleetError as exc:
                log_event(logger, "fleet.timestamp_publish_failed", logging.WARNING, error=str(exc))
        return version

    def start(self) -> None:
        self._runner.start()

    def stop(self) -> None:
        self._runner.stop()
