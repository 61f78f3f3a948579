"""Issues signed director documents with a persisted, strictly increasing sequence per addressee.

The sequence lives in the database (`director_sequences`, one row per `device:<id>` /
`cohort:<name>`: `<state_dir>/director.sqlite` by default, the fleet's PostgreSQL database with
`--database`) so it survives restarts and concurrent issuers: a device refuses any document
whose sequence is not above the last it accepted, so the fleet must never reuse one. Each
allocation is one atomic statement in its own committed transaction, `INSERT ... ON CONFLICT
DO UPDATE SET sequence = sequence + 1 RETURNING sequence`: PostgreSQL locks the row for the
upsert, SQLite runs it under `BEGIN IMMEDIATE`, so several fleet processes never get the same
number.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.contract.collect import CollectPolicy
from agent.contract.director import DeltaRef, DirectorDocument, TargetRef, sign_director
from agent.contract.windows import UpdateWindows
from agent.logs import log_event
from fleet.db.database import Database
from fleet.db.director_tables import director_sequences
from fleet.db.sql import upsert_statement
from fleet.errors import FleetInputError
from fleet.trust.keys import KEYS_FILE, KeyStore

logger = logging.getLogger("edgefleet.director")
DEFAULT_TTL = timedelta(days=7)
MAX_TTL = timedelta(days=365)


class DirectorSigner:
    """Signs director documents with the key store's `director` keys.

    A rollout signs one document per device, so the signer keeps its database open (each
    sequence is still its own durable transaction) and reuses the loaded signers until the key
    store's file changes (a rotation replaces it). Thread-safe. `database` is a `postgresql://`
    URL to keep the sequences there; without it they live in `state_dir/director.sqlite`.
    Raises `FleetInputError` for a bad addressee/TTL and `SigningKeyError` if keys are missing.
    """

    def __init__(
        self, keystore: KeyStore, state_dir: Path, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        database: Path | str | None = None,
    ) -> None:
        self.keystore = keystore
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.state_dir / "director.sqlite"
        self.clock = clock
        self._lock = threading.Lock()
        self.database = Database(database if database is not None else self.db_path, "director",
                                 "director sequences", synchronous_full=True)
        table = director_sequences
        self._bump = upsert_statement(
            self.database.dialect, table, ("addressee",), ("addressee", "sequence"),
            {"sequence": lambda t, _excluded: t.c.sequence + 1}).returning(table.c.sequence)
        self._signers: tuple[tuple[int, int, int], list[Any]] | None = None

    def close(self) -> None:
        with self._lock:
            self.database.close()

    def _director_signers(self) -> list[Any]:
        """The director role's signers, reloaded only when the key store file was replaced."""
        try:
            st = (self.keystore.keys_dir / KEYS_FILE).stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, 0, 0)  # no key store: `signers` raises the real error below
        with self._lock:
            cached = self._signers
        if cached is not None and cached[0] == stamp:
            return cached[1]
        signers = self.keystore.signers("director")
        with self._lock:
            self._signers = (stamp, signers)
        return signers

    def _next_sequence(self, addressee: str) -> int:
        """The next sequence of `addressee` (1 for a new one), committed before it is used."""
        with self.database.tx() as db:
            seq = db.execute(self._bump, {"addressee": addressee, "sequence": 1}).scalar_one()
        return int(seq)

    def _next_sequences(self, addressees: list[str]) -> list[int]:
        """One durable transaction for a whole batch (one fsync instead of one per device): a
        multi-row `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` per 500 addressees."""
        table = director_sequences
        got: dict[str, int] = {}
        unique = list(dict.fromkeys(addressees))  # one row may be touched once per statement
        with self.database.tx() as db:
            for i in range(0, len(unique), 500):
                rows = [{"addressee": a, "sequence": 1} for a in unique[i:i + 500]]
                stmt = upsert_statement(db.dialect, table, ("addressee",), ("addressee", "sequence"),
                                        {"sequence": lambda t, _excluded: t.c.sequence + 1})
                for addressee, seq in db.execute(stmt.values(rows).returning(table.c.addressee,
                                                                             table.c.sequence)):
                    got[str(addressee)] = int(seq)
        return [got[a] for a in addressees]

    def issue_many(
        self,
        target: TargetRef,
        device_ids: list[str],
        shadow: TargetRef | None = None,
        ttl: timedelta = DEFAULT_TTL,
        rollout_id: str | None = None,
        reason: str = "",
        deltas: dict[str, DeltaRef] | None = None,
        windows: dict[str, UpdateWindows] | None = None,
    ) -> list[bytes]:
        """`issue` for a batch of devices (a stage of a rollout): the sequences are reserved in
        one transaction, then each document is signed; in the order of `device_ids`. `deltas`
        names, per device, the delta from its active bundle (devices that can apply one), `windows`
        its maintenance windows.

        Why: at fleet scale the per-document commit (synchronous, durable) cost more than the
        signature (`benchmarks/bench_rollout_scale.py`). A crash after the reservation only skips
        sequence numbers, which devices allow (strictly increasing, not contiguous).
        Raises `FleetInputError` (bad ttl or device id, invalid document)."""
        if not timedelta(0) < ttl <= MAX_TTL:
            raise FleetInputError(f"ttl {ttl} must be positive and at most {MAX_TTL}")
        if not device_ids:
            return []
        now = self.clock().astimezone(UTC).replace(microsecond=0)
        sequences = self._next_sequences([_addressee(d, None) for d in device_ids])
        signers = self._director_signers()
        out = []
        for dev, seq in zip(device_ids, sequences, strict=True):
            try:
                doc = DirectorDocument(device_id=dev, cohort=None, sequence=seq, issued_at=now,
                                       expires=now + ttl, target=target, shadow=shadow, rollout_id=rollout_id,
                                       reason=reason, delta=(deltas or {}).get(dev),
                                       windows=(windows or {}).get(dev))
            except ValueError as exc:
                raise FleetInputError(f"invalid director document: {exc}") from None
            out.append(sign_director(doc, signers))
        log_event(logger, "director.issued_batch", devices=len(device_ids), first=sequences[0],
                  target=target.path)
        return out

    def last_sequence(self, device_id: str | None = None, cohort: str | None = None) -> int:
        """The last sequence issued to an addressee (0 if none)."""
        with self.database.read() as db:
            seq = db.scalar("SELECT sequence FROM director_sequences WHERE addressee = :a",
                            {"a": _addressee(device_id, cohort)})
        return int(seq) if seq is not None else 0

    def issue(
        self,
        target: TargetRef,
        device_id: str | None = None,
        cohort: str | None = None,
        shadow: TargetRef | None = None,
        ttl: timedelta = DEFAULT_TTL,
        rollout_id: str | None = None,
        reason: str = "",
        delta: DeltaRef | None = None,
        windows: UpdateWindows | None = None,
        collect: CollectPolicy | None = None,
    ) -> bytes:
        """Sign a director document telling `device_id` (or `cohort`) to run `target` (and, with
        `collect`, to keep a sample of its inputs: `fleet.collection`).

        Raises `FleetInputError` (bad ttl or addressee, invalid document).
        """
        if not timedelta(0) < ttl <= MAX_TTL:
            raise FleetInputError(f"ttl {ttl} must be positive and at most {MAX_TTL}")
        addressee = _addressee(device_id, cohort)
        now = self.clock().astimezone(UTC).replace(microsecond=0)
        try:
            doc = DirectorDocument(
                device_id=device_id,
                cohort=cohort,
                sequence=self._next_sequence(addressee),
                issued_at=now,
                expires=now + ttl,
                target=target,
                shadow=shadow,
                delta=delta,
                rollout_id=rollout_id,
                reason=reason,
                windows=windows,
                collect=collect,
            )
        except ValueError as exc:
            raise FleetInputError(f"invalid director document: {exc}") from None
        data = sign_director(doc, self._director_signers())
        log_event(logger, "director.issued", addressee=addressee, sequence=doc.sequence, target=target.path)
        return data


def _addressee(device_id: str | None, cohort: str | None) -> str:
    if (device_id is None) == (cohort is None):
        raise FleetInputError("give exactly one of device_id or cohort")
    return f"device:{device_id}" if device_id is not None else f"cohort:{cohort}"
