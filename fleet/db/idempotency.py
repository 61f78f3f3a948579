"""Stored first responses of create requests, so a retried create replays instead of repeating.

Keyed by (actor, Idempotency-Key): the API's `idempotent_create` looks a key up, runs the
create and saves its response in one transaction. Keys expire after a retention window
(`purge`), which bounds the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet.db.database import FleetDatabase
from fleet.db.rows import Record, dumps, iso


@dataclass(frozen=True, slots=True)
class StoredResponse(Record):
    """One `idempotency_keys` row; `response` is the decoded JSON body first answered."""

    JSON_COLUMNS = ("response",)

    actor: str
    key: str
    route: str
    request_hash: str
    status_code: int
    response: Any
    created_at: str


class IdempotencyRepo:
    """Stored first responses of create requests, keyed by (actor, Idempotency-Key)."""

    def __init__(self, database: FleetDatabase) -> None:
        self.database = database

    def get(self, actor: str, key: str) -> StoredResponse | None:
        with self.database.read() as db:
            rows = list(db.query("SELECT * FROM idempotency_keys WHERE actor = ? AND key = ?", [actor, key]))
        return StoredResponse.from_row(rows[0]) if rows else None

    def save(self, actor: str, key: str, route: str, request_hash: str, status: int, response: Any) -> None:
        with self.database.tx() as db:
            db.table("idempotency_keys").insert(
                {
                    "actor": actor,
                    "key": key,
                    "route": route,
                    "request_hash": request_hash,
                    "status_code": status,
                    "response": dumps(response),
                    "created_at": self.database.now(),
                }
            )

    def purge(self, older_than_seconds: float) -> int:
        """Forget keys older than the retention window; returns how many were removed."""
        cutoff = iso(self.database.clock() - older_than_seconds)
        with self.database.tx() as db:
            return int(db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", [cutoff]).rowcount)
