"""Collection requests as stored: what an operator asked, of which devices, and how far it got.

A collection asks the devices that match a label selector *and run one model version* to keep a
sample of their inputs under a `CollectPolicy` (`agent.contract.collect`) whose `policy_id` is
the collection id. `status` is what the fleet wants now (`decisions.py` moves it); `applied` is
the status the devices' signed director documents already reflect. The driver persists a new
`status` before it publishes anything and sets `applied` afterwards, so a crash between the two
is resumed by publishing again (`driver.py`).

Table `collections` of the telemetry group (`fleet.db.schema`, revision `telemetry_0004`), in
the same database as `dataset_versions` (`fleet.registry.datasets.DatasetStore.database`).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.contract.collect import CollectPolicy
from fleet.db.database import Database
from fleet.errors import Conflict, FleetInputError, NotFound

STATUSES = ("pending", "waiting_for_drift", "collecting", "closed", "stopped")
FINAL = frozenset({"closed", "stopped"})
UPLOAD_GRACE_S = 300.0  # after max_seconds, how long devices may still upload their sample


@dataclass(frozen=True)
class Collection:
    """One stored collection request."""

    collection_id: str
    model: str
    version: str
    selector: str
    policy: CollectPolicy
    devices: tuple[str, ...]  # the devices whose documents carry (or carried) the policy
    status: str
    applied: str
    created_by: str
    created_at: float
    closes_at: float  # 0 until the policy first goes out; then sent + max_seconds + grace
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"collection_id": self.collection_id, "model": self.model, "version": self.version,
                "selector": self.selector, "policy": _policy_dict(self.policy), "devices": list(self.devices),
                "status": self.status, "applied": self.applied, "created_by": self.created_by,
                "created_at": self.created_at, "closes_at": self.closes_at, "updated_at": self.updated_at}


def _policy_dict(p: CollectPolicy) -> dict[str, Any]:
    return {f: getattr(p, f) for f in p.__struct_fields__}


def new_collection_id() -> str:
    return f"col-{secrets.token_hex(6)}"


def make_policy(collection_id: str, **fields: Any) -> CollectPolicy:
    """The signed policy for a request. Raises `FleetInputError` naming the bad field."""
    try:
        return CollectPolicy(policy_id=collection_id, **fields)
    except (TypeError, ValueError) as exc:
        raise FleetInputError(f"collection policy: {exc}") from None


class CollectionStore:
    """CRUD over `collections` in `database` (shared with the `DatasetStore`). Thread-safe."""

    def __init__(self, database: Database, clock: Callable[[], float]) -> None:
        self.database = database
        self._clock = clock
        self._lock = threading.Lock()

    def create(self, model: str, version: str, selector: str, policy: CollectPolicy,
               actor: str) -> Collection:
        now = self._clock()
        row = {"collection_id": policy.policy_id, "model": model, "version": version, "selector": selector,
               "policy": json.dumps(_policy_dict(policy), sort_keys=True), "devices": "[]",
               "status": "pending", "applied": "none", "created_by": actor, "created_at": now,
               "closes_at": 0.0, "updated_at": now}
        with self._lock, self.database.tx() as db:
            if db.one("SELECT 1 FROM collections WHERE collection_id = :id", {"id": policy.policy_id}):
                raise Conflict(f"collection {policy.policy_id!r} exists")
            db.insert("collections", row)
        return self.get(policy.policy_id)

    def get(self, collection_id: str) -> Collection:
        """Raises `NotFound`."""
        with self.database.read() as db:
            row = db.one("SELECT * FROM collections WHERE collection_id = :id", {"id": collection_id})
        if row is None:
            raise NotFound(f"no collection {collection_id!r}")
        return _from_row(row)

    def list(self, open_only: bool = False) -> list[Collection]:
        with self.database.read() as db:
            rows = db.query("SELECT * FROM collections ORDER BY created_at, collection_id")
        found = [_from_row(r) for r in rows]
        return [c for c in found if not (open_only and c.status in FINAL and c.applied == c.status)]

    def update(self, collection_id: str, **fields: Any) -> Collection:
        """Set `status`, `applied`, `devices` (a list) or `closes_at`. Raises `NotFound`."""
        row = {k: (json.dumps(sorted(v)) if k == "devices" else v) for k, v in fields.items()}
        row["updated_at"] = self._clock()
        sets = ", ".join(f"{k} = :{k}" for k in row)
        with self._lock, self.database.tx() as db:
            n = db.execute(f"UPDATE collections SET {sets} WHERE collection_id = :collection_id",  # noqa: S608
                           {**row, "collection_id": collection_id}).rowcount
        if not n:
            raise NotFound(f"no collection {collection_id!r}")
        return self.get(collection_id)

    def stop(self, collection_id: str) -> Collection:
        """Ask for the policy to be withdrawn (the driver re-signs the documents without it)."""
        c = self.get(collection_id)
        if c.status in FINAL:
            return c
        return self.update(collection_id, status="stopped")


def _from_row(r: dict[str, Any]) -> Collection:
    return Collection(r["collection_id"], r["model"], r["version"], r["selector"],
                      CollectPolicy(**json.loads(r["policy"])), tuple(json.loads(r["devices"])), r["status"],
                      r["applied"], r["created_by"], float(r["created_at"]), float(r["closes_at"]),
                      float(r["updated_at"]))
