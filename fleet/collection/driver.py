"""The collection driver: moves collections through `decisions.py` and signs the documents.

Each tick (leader only, like the rollout controller) it reads every open collection, persists
its next status, then, if the devices' documents do not reflect it yet (`applied`), signs one
director document per device with the policy (collecting) or without it (withdrawn: waiting
for drift, closed, stopped) and publishes it retained on the device's desired topic, then
records `applied`. The document names the bundle the device already runs (its reported
`active_bundle` must be the collection's model version), so asking for a sample never changes
what a device runs; a device that moved to another bundle since is left alone (a rollout's
newer document already replaced the one carrying the policy).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from agent.contract.collect import CollectPolicy
from agent.contract.director import TargetRef
from agent.logs import log_event
from fleet.collection.decisions import documents_for, next_status
from fleet.collection.records import UPLOAD_GRACE_S, Collection, CollectionStore
from fleet.devices.selector import parse_selector
from fleet.errors import FleetError, FleetInputError
from fleet.periodic import PeriodicRunner
from fleet.store import Store
from fleet.telemetry.alert_records import EPISODES_TABLE
from fleet.telemetry.alerts import AlertManager

logger = logging.getLogger("edgefleet.collection")
DOCUMENT_TTL = timedelta(days=7)


class PolicySigner(Protocol):
    """What the driver needs of `fleet.trust.director_signer.DirectorSigner`."""

    def issue(self, target: TargetRef, device_id: str | None = None, *, ttl: timedelta = ...,
              reason: str = "", collect: CollectPolicy | None = None) -> bytes: ...


class DesiredSink(Protocol):
    def publish_desired(self, device_id: str | None = None, cohort: str | None = None, *,
                        document: bytes) -> str: ...


class TargetIndex(Protocol):
    def target_ref(self, target_path: str) -> TargetRef: ...


class CollectionDriver:
    """Component `collection-driver`: `tick()` every `tick_s` while `active()`."""

    name = "collection-driver"

    def __init__(self, collections: CollectionStore, store: Store, repository: TargetIndex,
                 signer: PolicySigner, publisher: DesiredSink | None,
                 drift_open: Callable[[str, str], bool], clock: Callable[[], float] = time.time,
                 tick_s: float = 1.0, active: Callable[[], bool] = lambda: True,
                 upload_grace_s: float = UPLOAD_GRACE_S) -> None:
        self.collections, self.store, self.repository = collections, store, repository
        self.signer, self.publisher, self.drift_open = signer, publisher, drift_open
        self.clock, self.active, self.upload_grace_s = clock, active, upload_grace_s
        self._runner = PeriodicRunner(logger)
        self._runner.add(self.name, lambda: self.tick() if self.active() else None, tick_s)

    def start(self) -> None:
        self._runner.start()

    def stop(self) -> None:
        self._runner.stop()

    def tick(self) -> int:
        """One pass; returns how many documents were published."""
        sent = 0
        for c in self.collections.list(open_only=True):
            try:
                sent += self._advance(c)
            except FleetError as exc:  # bad model version, broker down: retried next tick
                log_event(logger, "collection.tick_failed", logging.WARNING, collection=c.collection_id,
                          error=str(exc))
        return sent

    def _advance(self, c: Collection) -> int:
        now = self.clock()
        drift = self.drift_open(c.model, c.version) if c.policy.only_while_drift else False
        status = next_status(c, now, drift)
        if status != c.status:  # persisted before any document goes out
            c = self.collections.update(c.collection_id, status=status)
            log_event(logger, "collection.status", collection=c.collection_id, status=status)
        if c.applied == c.status:
            return 0
        carry = documents_for(c.status, c.applied == "collecting")
        sent = 0
        if carry is not None and self.publisher is not None:
            sent = self._publish(c, carry, now)
        elif carry is not None:
            return 0  # no broker in this process: leave it for one that has
        fields: dict[str, object] = {"applied": c.status}
        if carry and not c.closes_at:
            fields["closes_at"] = now + c.policy.max_seconds + self.upload_grace_s
        self.collections.update(c.collection_id, **fields)
        return sent

    def _publish(self, c: Collection, carry: bool, now: float) -> int:
        assert self.publisher is not None
        version = self.store.models.get_version(c.model, c.version)
        if not version.bundle_target:
            raise FleetInputError(f"{c.model} {c.version} has no bundle in the repository")
        ref = self.repository.target_ref(version.bundle_target)
        bundle = f"{c.model}-{c.version}"
        if carry:
            candidates = self.store.devices.ids_matching(parse_selector(c.selector))
            devices = [d for d in candidates if self._runs(d, bundle)]
            c = self.collections.update(c.collection_id, devices=sorted(set(devices) | set(c.devices)))
        else:
            devices = [d for d in c.devices if self._runs(d, bundle)]
        policy = c.policy if carry else None
        reason = f"collection {c.collection_id} {'start' if carry else c.status}"
        for dev in devices:
            doc = self.signer.issue(ref, device_id=dev, ttl=DOCUMENT_TTL, reason=reason, collect=policy)
            self.publisher.publish_desired(device_id=dev, document=doc)
        log_event(logger, "collection.published", collection=c.collection_id, devices=len(devices),
                  policy=carry, status=c.status)
        return len(devices)

    def _runs(self, device_id: str, bundle: str) -> bool:
        reported = self.store.devices.get(device_id).reported_state or {}
        return reported.get("active_bundle") == bundle


def drift_episode_open(alerts: AlertManager, model: str, version: str) -> bool:
    """Whether the alert manager has an open drift episode for the model version (any cohort)."""
    with alerts.database.read() as db:
        n = db.scalar(f"SELECT count(*) FROM {EPISODES_TABLE} WHERE model = :m AND version = :v",  # noqa: S608
                      {"m": model, "v": version})
    return bool(n)

