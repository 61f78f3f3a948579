"""Device report keys: each device's Ed25519 public key and the report counters it used.

A device registers its key at enrollment (`report_public_key`, `fleet.devices.enrollment`); an
operator registers or rotates one for a device enrolled before keys (`PUT
/v1/devices/{id}/report-key`, audited). The replay state is in the database (store_0009; the
`dataset` kind's floor column: store_0012), so several ingest workers on one database (SQLite or
PostgreSQL) accept each counter at most once:
every accepted counter is *claimed* in `device_report_seen` (primary key device, kind, counter:
`INSERT ... ON CONFLICT DO NOTHING`, the worker whose insert won accepts), above a per-(device,
kind) floor in `device_report_keys`. Why claims and not "above the highest so far": a shared
subscription hands one device's messages to several workers round-robin, so they are *processed*
out of order; a strict high-water mark dropped every report a slower worker handled after a faster
one (measured: half the reports of `tests/fleet/cluster/test_ingest_restart.py`). Claims older than
`RETENTION_S` are folded into the floor (raised to the highest of them) and deleted, so a report
delayed longer than that, or replayed later, is refused. Registering a key resets floor and claims.

Cost: one committed INSERT per report. With the store's durable commits (SQLite `synchronous =
FULL`, an fsync each) that quartered ingest throughput, so counter advances commit
asynchronously: on SQLite through a second connection pool with `synchronous = NORMAL` (WAL: a
commit survives a process crash, not always a power cut), on PostgreSQL with `SET LOCAL
synchronous_commit = off` (the same). After a power cut of the fleet's host the claims of the
last moments may be forgotten, so a replay of exactly those reports could pass once; the event
log and telemetry ingest still drop them as duplicates of their (device, seq).
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from agent.contract.report_auth import KINDS
from fleet.db.audit import AuditRepo
from fleet.db.database import Database, FleetDatabase
from fleet.db.engine import autocommit_engine
from fleet.errors import FleetInputError, NotFound

KEY_BYTES = 32
# The claim of one counter: new and above the floor, whichever worker races (the primary key
# decides); built once per kind (a TextClause parses its binds when made, per report otherwise).
_CLAIMS = {kind: sa.text(
    "INSERT INTO device_report_seen (device_id, kind, counter, received_at) "  # noqa: S608 - fixed names
    f"SELECT :d, :k, :c, :t WHERE :c > (SELECT {kind}_counter FROM device_report_keys "
    "WHERE device_id = :d) ON CONFLICT (device_id, kind, counter) DO NOTHING") for kind in KINDS}
_TOP = sa.text("SELECT MAX(counter) FROM device_report_seen WHERE device_id = :d AND kind = :k")
RETENTION_S = 600.0  # claimed counters kept this long; older ones fold into the per-kind floor
PRUNE_EVERY_S = 60.0


def parse_public_key(text: object) -> bytes:
    """A base64 raw Ed25519 public key (32 bytes) as bytes. Raises FleetInputError."""
    if not isinstance(text, str):
        raise FleetInputError("report_public_key must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FleetInputError("report_public_key is not base64") from None
    if len(raw) != KEY_BYTES:
        raise FleetInputError(f"report_public_key must be a raw {KEY_BYTES}-byte Ed25519 key, "
                              f"not {len(raw)} bytes")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # lazy: with a key only

    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise FleetInputError("report_public_key is not an Ed25519 public key") from None
    return raw


def _synchronous_normal(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA synchronous = NORMAL")  # WAL: no fsync per commit; survives a process crash
    finally:
        cur.close()


class ReportKeyRepo:
    """`device_report_keys`: register/rotate (audited), look up (cached), advance counters."""

    def __init__(self, database: FleetDatabase, audit: AuditRepo, cache_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, retention_s: float = RETENTION_S) -> None:
        self.database = database
        self.audit = audit
        self.cache_s = cache_s
        self.clock = clock
        self._cache: dict[str, tuple[float, bytes | None]] = {}
        self._lock = threading.Lock()
        self._fast: Database | None = None  # SQLite: the counters' own pool, commits without fsync
        self._autocommit: sa.Engine | None = None  # PostgreSQL: the claims' own pool (`_claim_autocommit`)
        self.retention_s = retention_s
        self._pruned_at: float | None = None

    def _counters(self) -> Database:
        if self.database.dialect != "sqlite":
            return self.database
        with self._lock:
            if self._fast is None:
                fast = Database(self.database.location, "store", "report counters", busy_timeout_ms=5000)
                sa.event.listen(fast.engine, "connect", _synchronous_normal)
                fast.engine.dispose()  # the pool's connection from opening it predates the listener
                self._fast = fast
            return self._fast

    def close(self) -> None:
        with self._lock:
            if self._fast is not None:
                self._fast.close()
                self._fast = None
            if self._autocommit is not None:
                self._autocommit.dispose()
                self._autocommit = None

    def register(self, device_id: str, public_key: bytes, actor: str, audited: bool = True) -> None:
        """Set the device's report key (replacing any), reset its counters. Raises NotFound."""
        encoded = base64.b64encode(public_key).decode()
        with self.database.tx() as db:
            if db.scalar("SELECT id FROM devices WHERE id = :id", {"id": device_id}) is None:
                raise NotFound(f"device {device_id!r} not found")
            before = db.scalar("SELECT public_key FROM device_report_keys WHERE device_id = :id",
                               {"id": device_id})
            row = {"device_id": device_id, "public_key": encoded, "registered_at": time.time(),
                   "registered_by": actor, **{f"{k}_counter": 0 for k in KINDS}}
            db.upsert("device_report_keys", row, key=["device_id"])
            db.execute("DELETE FROM device_report_seen WHERE device_id = :id", {"id": device_id})
            if audited:
                self.audit.record(actor, "device.report_key", f"device:{device_id}",
                                  {"report_public_key": before}, {"report_public_key": encoded})
        with self._lock:
            self._cache.pop(device_id, None)

    def key_of(self, device_id: str, fresh: bool = False) -> bytes | None:
        """The device's raw public key, or None; cached `cache_s` (`fresh`: read the database)."""
        now = self.clock()
        with self._lock:
            hit = self._cache.get(device_id)
        if hit is not None and not fresh and now - hit[0] < self.cache_s:
            return hit[1]
        with self.database.read() as db:
            text = db.scalar("SELECT public_key FROM device_report_keys WHERE device_id = :id",
                             {"id": device_id})
        key = base64.b64decode(text) if text is not None else None
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[device_id] = (now, key)
        return key

    def advance(self, device_id: str, kind: str, counter: int) -> str | None:
        """Claim `counter` for (device, kind): None when it is new (now claimed), else why not:
        `duplicate` (the highest claimed counter again), `replayed` (claimed before, or at or
        below the forgotten floor). Nothing changes when it is refused."""
        if kind not in KINDS:
            raise ValueError(f"unknown report kind {kind!r}")
        now = time.time()
        claim = _CLAIMS[kind]
        args = {"d": device_id, "k": kind, "c": counter, "t": now}
        if self.database.dialect == "postgresql":
            refused = self._claim_autocommit(claim, args)
        else:
            with self._counters().tx() as db:
                # new and above the floor, whichever worker races: the primary key decides
                if db.execute(claim, args).rowcount == 1:
                    refused = None
                else:
                    top = db.scalar(_TOP, args)
                    refused = "duplicate" if top is not None and int(top) == counter else "replayed"
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            self.prune(now - self.retention_s)
        return refused

    def _claim_autocommit(self, claim: sa.TextClause, args: dict[str, Any]) -> str | None:
        """PostgreSQL: the claim as one statement on an autocommit connection of the counters'
        own pool (`synchronous_commit = off` set once per connection, no pre-ping): one round
        trip per report instead of five (ping, SET LOCAL, INSERT, COMMIT, and the process-wide
        write lock around them), which was a third of an ingest worker's CPU per signed report. One
        INSERT ... ON CONFLICT is atomic by itself, so the answer is the one the transaction gave.
        A pooled connection the server dropped is retried once on a fresh one (what pre-ping did)."""
        for attempt in (0, 1):
            try:
                with self._autocommit_engine().connect() as conn:
                    if conn.execute(claim, args).rowcount == 1:
                        return None
                    top = conn.execute(_TOP, args).scalar()
                    return "duplicate" if top is not None and int(top) == args["c"] else "replayed"
            except sa.exc.DBAPIError as exc:
                if attempt or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    def _autocommit_engine(self) -> sa.Engine:
        with self._lock:
            if self._autocommit is None:
                self._autocommit = autocommit_engine(self.database.engine.url)
            return self._autocommit

    def claimed(self, device_id: str, kind: str, counter: int) -> bool:
        """Whether `counter` is claimed for (device, kind) and not yet folded into the floor."""
        with self._counters().tx() as db:
            return db.scalar("SELECT COUNT(*) FROM device_report_seen WHERE device_id = :d AND kind = :k "
                             "AND counter = :c", {"d": device_id, "k": kind, "c": counter}) == 1

    def prune(self, cutoff: float) -> int:
        """Forget counters claimed before `cutoff`, raising each (device, kind) floor to the highest
        of them: a report that old is then refused as replayed, whether seen or not."""
        with self._counters().tx() as db:
            for kind in KINDS:
                column = f"{kind}_counter"
                old = ("(SELECT MAX(s.counter) FROM device_report_seen s WHERE s.device_id = "
                       "device_report_keys.device_id AND s.kind = :k AND s.received_at < :cut)")
                db.execute(f"UPDATE device_report_keys SET {column} = {old} "  # noqa: S608
                           f"WHERE {old} > {column}", {"k": kind, "cut": cutoff})
            cur = db.execute("DELETE FROM device_report_seen WHERE received_at < :cut", {"cut": cutoff})
            return int(cur.rowcount)

    def last_counters(self, device_id: str) -> dict[str, int]:
        """The highest accepted counter per kind (all 0 for a fresh key; empty without a key)."""
        with self.database.read() as db:
            columns = ", ".join(f"{k}_counter" for k in KINDS)  # fixed names
            row = db.one(f"SELECT {columns} FROM device_report_keys WHERE device_id = :d",  # noqa: S608
                         {"d": device_id})
            if row is None:
                return {}
            seen = {r["kind"]: int(r["top"]) for r in db.query(
                "SELECT kind, MAX(counter) AS top FROM device_report_seen WHERE device_id = :d GROUP BY kind",
                {"d": device_id})}
        return {k: max(int(row[f"{k}_counter"]), seen.get(k, 0)) for k in KINDS}
