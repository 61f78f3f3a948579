"""Issues signed director documents with a persisted, strictly increasing sequence per addressee.

The sequence lives in SQLite (one row per `device:<id>` / `cohort:<name>`, bumped inside a
transaction) so it survives restarts and concurrent issuers: a device refuses any document whose
sequence is not above the last it accepted, so the fleet must never reuse one.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.contract.director import DirectorDocument, TargetRef, sign_director
from agent.contract.windows import UpdateWindows
from agent.logs import log_event
from fleet.db.connection import open_sqlite
from fleet.errors import FleetInputError
from fleet.trust.keys import KEYS_FILE, KeyStore

logger = logging.getLogger("edgefleet.director")
DEFAULT_TTL = timedelta(days=7)
MAX_TTL = timedelta(days=365)


class DirectorSigner:
    """Signs director documents with the key store's `director` keys.

    A rollout signs one document per device, so the signer keeps one SQLite connection (each
    sequence is still its own durable transaction) and reuses the loaded signers until the key
    store's file changes (a rotation replaces it). Thread-safe.
    Raises `FleetInputError` for a bad addressee/TTL and `SigningKeyError` if keys are missing.
    """

    def __init__(
        self, keystore: KeyStore, state_dir: Path, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.keystore = keystore
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.state_dir / "director.sqlite"
        self.clock = clock
        self._lock = threading.Lock()
        self._db = self._connect()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS sequences (addressee TEXT PRIMARY KEY, sequence INTEGER)"
        )
        self._signers: tuple[tuple[int, int, int], list[Any]] | None = None

    def _connect(self) -> sqlite3.Connection:
        # Autocommit: `_next_sequence` issues its own BEGIN IMMEDIATE / COMMIT.
        return open_sqlite(self.db_path, synchronous_full=True, autocommit=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT sequence FROM sequences WHERE addressee = ?", (addressee,)
                ).fetchone()
                seq = (row[0] if row else 0) + 1
                db.execute(
                    "INSERT INTO sequences (addressee, sequence) VALUES (?, ?) "
                    "ON CONFLICT(addressee) DO UPDATE SET sequence = excluded.sequence",
                    (addressee, seq),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return int(seq)

    def last_sequence(self, device_id: str | None = None, cohort: str | None = None) -> int:
        """The last sequence issued to an addressee (0 if none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT sequence FROM sequences WHERE addressee = ?", (_addressee(device_id, cohort),)
            ).fetchone()
        return int(row[0]) if row else 0

    def issue(
        self,
        target: TargetRef,
        device_id: str | None = None,
        cohort: str | None = None,
        shadow: TargetRef | None = None,
        ttl: timedelta = DEFAULT_TTL,
        rollout_id: str | None = None,
        reason: str = "",
        windows: UpdateWindows | None = None,
    ) -> bytes:
        """Sign a director document telling `device_id` (or `cohort`) to run `target`.

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
                rollout_id=rollout_id,
                reason=reason,
                windows=windows,
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
