"""The audit log: who changed what, on which resource, with the state before and after.

Every write that an operator causes records an entry in the same transaction as the change,
so the log cannot miss a change that committed. It lives beside the database layer because
every feature slice writes to it; it is append-only and never audits itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet.db.database import FleetDatabase
from fleet.db.paging import Page
from fleet.db.rows import Record, dumps


@dataclass(frozen=True, slots=True)
class AuditEntry(Record):
    """One `audit_log` row; `before` and `after` are the decoded JSON documents (or None)."""

    JSON_COLUMNS = ("before", "after")

    id: int
    at: str
    actor: str
    action: str
    resource: str
    before: Any
    after: Any


class AuditRepo:
    """Append-only record of every change: who, what, on which resource, before and after."""

    def __init__(self, database: FleetDatabase) -> None:
        self.database = database

    def record(self, actor: str, action: str, resource: str, before: Any, after: Any) -> None:
        """Append one entry; call inside the transaction that made the change."""
        with self.database.tx() as db:
            db.insert("audit_log",
                {
                    "at": self.database.now(),
                    "actor": actor,
                    "action": action,
                    "resource": resource,
                    "before": None if before is None else dumps(before),
                    "after": None if after is None else dumps(after),
                }
            )

    def list(
        self,
        cursor: str | None,
        limit: int,
        resource: str | None = None,
        actor: str | None = None,
        action: str | None = None,
    ) -> Page[AuditEntry]:
        """Newest first, optionally filtered by exact resource, actor or action."""
        sql, params = "SELECT * FROM audit_log WHERE TRUE", {}
        for col, val in (("resource", resource), ("actor", actor), ("action", action)):
            if val is not None:
                sql += f" AND {col} = :{col}"
                params[col] = val
        return self.database.page_of(sql, params, "id", cursor, limit, AuditEntry.from_row, descending=True)
