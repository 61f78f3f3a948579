"""Stored first responses of create requests, so a retried create replays instead of repeating.

Keyed by (actor, Idempotency-Key): the API's `idempotent_create` looks a key up, runs the
create and saves its response in one transaction. Keys expire after a retention window
(`purge`), which bounds the table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
    """Stored first responses of create requests, keyed by (actor, Idempotency-Key).

    Never a secret: a replay record lives for `idempotency_ttl_seconds` in a file that backups
    copy, so the caller stores the response without its one-time key or token.
    """

    def __init__(self, database: FleetDatabase) -> None:
        self.database = database

    def get(self, actor: str, key: str) -> StoredResponse | None:
        with self.database.read() as db:
            row = db.one("SELECT * FROM idempotency_keys WHERE actor = :actor AND key = :key",
                         {"actor": actor, "key": key})
        return StoredResponse.from_row(row) if row else None

    def save(self, actor: str, key: str, route: str, request_hash: str, status: int, response: Any) -> None:
        with self.database.tx() as db:
            db.insert("idempotency_keys",
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

    def scrub(self, is_secret: Callable[[Any], bool]) -> int:
        """Drop the top-level response fields `is_secret` flags from every stored record (rows an
        older version wrote with the plaintext in them); returns how many rows changed.

        The WAL is checkpointed and truncated afterwards (and `secure_delete` zeroes freed
        space), so the plaintext does not linger in the files either.
        """
        changed = 0
        with self.database.tx() as db:
            for row in db.query("SELECT actor, key, response FROM idempotency_keys"):
                response = json.loads(row["response"])
                if not isinstance(response, dict) or not any(map(is_secret, response.values())):
                    continue
                kept = {k: v for k, v in response.items() if not is_secret(v)}
                db.execute("UPDATE idempotency_keys SET response = :response "
                           "WHERE actor = :actor AND key = :key",
                           {"response": dumps(kept), "actor": row["actor"], "key": row["key"]})
                changed += 1
        if changed:
            self.database.checkpoint()
        return changed

    def purge(self, older_than_seconds: float) -> int:
        """Forget keys older than the retention window; returns how many were removed."""
        cutoff = iso(self.database.clock() - older_than_seconds)
        with self.database.tx() as db:
            return int(db.execute("DELETE FROM idempotency_keys WHERE created_at < :cutoff",
                                  {"cutoff": cutoff}).rowcount)
