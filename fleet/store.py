"""The fleet's durable state: one database (a SQLite file or PostgreSQL), a repository per resource.

`Store` opens the database (`fleet.db.database.FleetDatabase`: connection, lock,
transactions, paging, migrations) and hands out the repositories: `store.models`,
`store.devices`, `store.access`, `store.rollouts`, `store.training`, `store.audit`,
`store.idempotency`. It
sits above the feature slices so that none of them imports it: each slice's repository
builds on `fleet.db` alone, and this module is the one place that puts them together.
Every write that an operator causes records an audit row in the same transaction.
"""

from __future__ import annotations

import time
from pathlib import Path

from fleet.access.credentials import AccessRepo
from fleet.db.audit import AuditRepo
from fleet.db.database import Clock, FleetDatabase
from fleet.db.idempotency import IdempotencyRepo
from fleet.devices.inventory import DeviceRepo
from fleet.devices.report_keys import ReportKeyRepo
from fleet.registry.versions import ModelRepo
from fleet.rollouts.store import RolloutRepo
from fleet.training.jobs import TrainingJobs

__all__ = ["Clock", "Store"]


class Store(FleetDatabase):
    """Open (creating and migrating as needed) the fleet database at `location` (a SQLite file
    path or a `postgresql://` URL), with its repositories.

    Raises FleetMisuseError if the database cannot be opened.
    """

    def __init__(self, location: Path | str, clock: Clock = time.time, busy_timeout_ms: int = 5000) -> None:
        super().__init__(location, clock, busy_timeout_ms)
        self.audit = AuditRepo(self)
        self.idempotency = IdempotencyRepo(self)
        self.models = ModelRepo(self, self.audit)
        self.devices = DeviceRepo(self, self.audit)
        self.report_keys = ReportKeyRepo(self, self.audit)
        self.access = AccessRepo(self, self.audit)
        self.rollouts = RolloutRepo(self)
        self.training = TrainingJobs(self, self.audit, clock)  # fleet/training (issue 13)

    def close(self) -> None:
        self.report_keys.close()
        super().close()
