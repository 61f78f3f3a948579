"""`LeaderElector`: keeps (or waits for) the lease that makes this process the active rollout
controller and drift monitor; standbys take over within the lease's TTL when the leader dies.

Every `ttl_s / 3` it reads the lease, asks `fleet.cluster.lease.decide` what to do and
compare-and-swaps the row. A hand-over is audited (`leader.acquired`, with the previous holder
and token) in the same transaction as the swap. `is_leader()` is local and cheap (the tick of
each guarded component asks it first); `fence()` is the database-side guard: components call it
inside the transaction of each action, so the action of a leader that lost the lease without
noticing (a paused process) rolls back instead of racing the new leader.

Errors: a failed renewal (database unreachable) is logged; the process stays leader only
until the expiry it last wrote, which the standby also waits for.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from agent.logs import log_event
from fleet.cluster.lease import LeaseLost, LeaseRepo, LeaseRow, Verdict, decide
from fleet.db.database import FleetDatabase
from fleet.errors import FleetInputError
from fleet.periodic import PeriodicRunner
from fleet.store import Store

logger = logging.getLogger("edgefleet.fleet.cluster")
CONTROLLER_LEASE = "controller"
DEFAULT_TTL_S = 5.0


def process_identity() -> str:
    """host:pid:random, unique per process start (a restarted process is a new holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class LeaderElector:
    """The lease loop as a service component (start it before the components it guards)."""

    name = "leader-elector"

    def __init__(self, store: Store, lease: str = CONTROLLER_LEASE, holder: str | None = None,
                 ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time,
                 on_acquired: Callable[[], None] | None = None, owns_store: bool = False,
                 guarded: FleetDatabase | None = None) -> None:
        """`store` should be a connection of the elector's own (`owns_store`: closed at stop): on
        a shared one, renewals queue behind the controller's long transactions in this process
        and the lease expires under load. `guarded`: the database of the components it guards
        (default `store`): `fence()` reads the token there, inside their transaction.
        Raises `FleetInputError` for a TTL outside 0.3 .. 600 s."""
        if not 0.3 <= ttl_s <= 600:
            raise FleetInputError("leader lease ttl must be within 0.3 .. 600 s")
        self.store = store
        self.repo = LeaseRepo(store)
        self._fence_repo = LeaseRepo(guarded if guarded is not None else store)
        self.lease = lease
        self.holder = holder or process_identity()
        self.ttl_s = ttl_s
        self.clock = clock
        self.on_acquired = on_acquired
        self.owns_store = owns_store
        self._lock = threading.Lock()
        self._token: int | None = None
        self._valid_until = 0.0
        self.acquisitions = 0
        self._runner = PeriodicRunner(logger)
        self._runner.add(self.name, self.step, ttl_s / 3, run_at_start=True)

    # -- component -----------------------------------------------------------------------
    def start(self) -> None:
        self._runner.start()

    def stop(self) -> None:
        """Stop renewing and release the lease, so a standby takes over at once."""
        self._runner.stop()
        with self._lock:
            token, self._token, self._valid_until = self._token, None, 0.0
        if token is not None:
            try:
                self.repo.release(self.lease, self.holder, token)
                log_event(logger, "leader.released", lease=self.lease, holder=self.holder, token=token)
            except Exception as exc:  # the lease then expires by itself within the TTL
                log_event(logger, "leader.release_failed", logging.WARNING, error=str(exc))
        if self.owns_store:
            self.store.close()

    # -- queries (any thread) --------------------------------------------------------------
    def is_leader(self) -> bool:
        with self._lock:
            return self._token is not None and self.clock() < self._valid_until

    @property
    def token(self) -> int | None:
        with self._lock:
            return self._token

    def fence(self) -> int:
        """Inside an action's transaction: raise `LeaseLost` unless we still hold the lease.
        Returns the token (written with the action)."""
        token = self.token
        if token is None or not self.is_leader():
            raise LeaseLost(f"not the leader of {self.lease!r}")
        self._fence_repo.check_fence(self.lease, token)
        return token

    # -- one round -------------------------------------------------------------------------
    def step(self) -> Verdict:
        """Read, decide, compare-and-swap; returns what was decided (STANDBY also when the swap
        lost a race)."""
        now = self.clock()
        row = self.repo.read(self.lease)
        decision = decide(row, self.holder, now, self.ttl_s)
        if decision.write is None:
            self._lose(row)
            return Verdict.STANDBY
        won = self._swap(row, decision.write, decision.verdict)
        if not won:
            self._lose(row)
            return Verdict.STANDBY
        with self._lock:
            self._token, self._valid_until = decision.write.fencing_token, decision.write.expires_at
        if decision.verdict is Verdict.ACQUIRE:
            self.acquisitions += 1
            log_event(logger, "leader.acquired", lease=self.lease, holder=self.holder,
                      token=decision.write.fencing_token, previous=row.holder or None)
            if self.on_acquired is not None:
                self.on_acquired()
        return decision.verdict

    def _swap(self, row: LeaseRow, new: LeaseRow, verdict: Verdict) -> bool:
        with self.store.tx():
            if not self.repo.swap(row, new):
                return False
            if verdict is Verdict.ACQUIRE:
                self.store.audit.record(
                    self.holder, "leader.acquired", f"leases/{self.lease}",
                    {"holder": row.holder or None, "fencing_token": row.fencing_token,
                     "expires_at": row.expires_at},
                    {"holder": new.holder, "fencing_token": new.fencing_token})
            return True

    def _lose(self, row: LeaseRow) -> None:
        with self._lock:
            was = self._token
            if was is None:
                return
            self._token, self._valid_until = None, 0.0
        log_event(logger, "leader.lost", logging.WARNING, lease=self.lease, holder=self.holder, token=was,
                  now_held_by=row.holder)


__all__ = ["CONTROLLER_LEASE", "LeaderElector", "LeaseLost", "process_identity"]
