"""The leader lease: one row per lease name in the fleet database, taken over when it expires.

Why a lease row and not a PostgreSQL advisory lock: it works the same on SQLite and
PostgreSQL, it survives a connection pool handing out different connections, and its
`fencing_token` (bumped at every change of holder) lets the database refuse the work of a
leader that lost the lease without noticing (paused, partitioned): controller actions check
the token inside their own transaction (`LeaseRepo.check_fence`).

`decide(row, me, now, ttl_s)` is the pure part: from the row as read, what to write. The I/O is
a compare-and-swap: the UPDATE names the holder and token it read, so of two processes that
read the same expired row only one changes it (the other sees 0 rows and stays standby).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from fleet.db.database import FleetDatabase
from fleet.errors import FleetError


class LeaseLost(FleetError):
    """This process's fencing token is no longer the lease's: a newer leader exists."""


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """The lease as stored; `holder` is '' for a lease nobody ever held."""

    name: str
    holder: str
    fencing_token: int
    expires_at: float


class Verdict(Enum):
    ACQUIRE = "acquire"  # free or expired: take it with a new token
    RENEW = "renew"  # ours and still valid: push the expiry
    STANDBY = "standby"  # someone else holds a valid lease


@dataclass(frozen=True, slots=True)
class LeaseDecision:
    verdict: Verdict
    write: LeaseRow | None  # the row to write (compare-and-swap against the one read), or None


def decide(row: LeaseRow, me: str, now: float, ttl_s: float) -> LeaseDecision:
    """What `me` should do with the lease at `now` (seconds of the shared clock)."""
    if row.holder == me:
        # Still ours, even if it expired meanwhile (a slow renewal): any other holder in between
        # would have changed holder and token, and the swap compares both, so keep the token.
        return LeaseDecision(Verdict.RENEW, LeaseRow(row.name, me, row.fencing_token, now + ttl_s))
    if row.holder and row.expires_at > now:
        return LeaseDecision(Verdict.STANDBY, None)
    # free, or another holder's lease expired: take it with a new token
    return LeaseDecision(Verdict.ACQUIRE, LeaseRow(row.name, me, row.fencing_token + 1, now + ttl_s))


class LeaseRepo:
    """Reads and compare-and-swaps lease rows through the fleet database's transactions."""

    def __init__(self, database: FleetDatabase) -> None:
        self.database = database

    def read(self, name: str) -> LeaseRow:
        """The lease row (created empty on first use)."""
        with self.database.read() as db:
            found = db.execute("SELECT holder, fencing_token, expires_at FROM leases WHERE name = :name",
                               {"name": name}).fetchone()
        if found is not None:
            return LeaseRow(name, str(found[0]), int(found[1]), float(found[2]))
        with self.database.tx() as db:
            db.upsert("leases", {"name": name, "holder": "", "fencing_token": 0, "expires_at": 0.0},
                      key=("name",), update=())
        return self.read(name)

    def swap(self, seen: LeaseRow, new: LeaseRow) -> bool:
        """Write `new` if the row is still `seen` (holder and token); True when it was.
        Call inside `database.tx()` to audit in the same transaction."""
        with self.database.tx() as db:
            cur = db.execute(
                "UPDATE leases SET holder = :holder, fencing_token = :token, expires_at = :expires "
                "WHERE name = :name AND holder = :seen_holder AND fencing_token = :seen_token",
                {"holder": new.holder, "token": new.fencing_token, "expires": new.expires_at,
                 "name": seen.name, "seen_holder": seen.holder, "seen_token": seen.fencing_token})
            return cur.rowcount == 1

    def release(self, name: str, holder: str, token: int) -> bool:
        """Expire our lease at once (clean stop), so a standby need not wait the TTL."""
        with self.database.tx() as db:
            cur = db.execute("UPDATE leases SET expires_at = 0 WHERE name = :name AND holder = :holder "
                             "AND fencing_token = :token", {"name": name, "holder": holder, "token": token})
            return cur.rowcount == 1

    def check_fence(self, name: str, token: int) -> None:
        """Raise `LeaseLost` unless `token` is still the lease's: call inside the transaction of
        the action it guards, so a stale leader's action rolls back with it. On SQLite that
        transaction holds the write lock (BEGIN IMMEDIATE), so no acquisition can commit in
        between; on PostgreSQL the read is `SELECT ... FOR SHARE`, which holds the row against a
        taker's UPDATE until this transaction ends: the same guarantee."""
        share = " FOR SHARE" if self.database.dialect == "postgresql" else ""
        with self.database.read() as db:
            found = db.execute(f"SELECT fencing_token FROM leases WHERE name = :name{share}",  # noqa: S608
                               {"name": name}).fetchone()
        if found is None or int(found[0]) != token:
            raise LeaseLost(f"lease {name!r}: token {token} is stale (now {found[0] if found else None})")
