"""`DocumentDispatch`: signs and publishes the rollout controller's director documents.

Kept apart from `fleet.rollouts.controller` (which decides *who* gets a document and when) because
this is the part that talks to the signer, the broker and the delta catalogue: each device's
document carries its maintenance windows and, for agents that apply deltas, the delta from the
bundle it runs. Documents are signed in batches (one sequence transaction per batch, not one per
device) and published until the broker fails; only the devices whose document went out are marked
assigned, in one fenced transaction, so a crash before it commits leaves them pending and the next
tick sends newer documents (harmless: the agent keeps the newest).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from agent.contract.director import DeltaRef, TargetRef
from agent.contract.windows import UpdateWindows
from agent.logs import log_event
from fleet.errors import FleetError, FleetInputError, FleetTransportError
from fleet.rollouts.controller_ports import (
    ControllerConfig,
    DeltaSource,
    DesiredPublisher,
    DirectorIssuer,
    TargetSource,
)
from fleet.rollouts.policies import windows_for
from fleet.rollouts.record_types import NO_REPORT, DeviceProgress, RolloutRuntime, bundle_index
from fleet.rollouts.records import RolloutRecords
from fleet.rollouts.strategies import StrategyConfig
from fleet.store import Store

logger = logging.getLogger("edgefleet.fleet.rollouts")
ASSIGN_BATCH = 500  # documents signed per sequence transaction (and published before the next batch)


class DocumentDispatch:
    """The controller's outbound side: one device's document (`send`) or a stage's (`assign`).

    `tx` opens the controller's fenced transaction, so a stale leader's assignments roll back."""

    def __init__(self, store: Store, records: RolloutRecords, repository: TargetSource,
                 signer: DirectorIssuer, publisher: DesiredPublisher | None, config: ControllerConfig,
                 deltas: DeltaSource | None,
                 tx: Callable[[], AbstractContextManager[None]]) -> None:
        self.store = store
        self.records = records
        self.repository = repository
        self.signer = signer
        self.publisher = publisher
        self.config = config
        self.deltas = deltas  # None: devices always fetch full bundles
        self._tx = tx

    def version_ref(self, version_id: str) -> TargetRef:
        """The repository target of a model version's bundle (`FleetInputError` if it has none)."""
        version = self.store.models.get_version_by_id(version_id)
        if not version.bundle_target:
            raise FleetInputError(f"{version_id} has no bundle in the repository (register it from a bundle)")
        return self.repository.target_ref(version.bundle_target)

    def send(self, rid: str, dev: str, ref: TargetRef, reason: str) -> bool:
        """Sign and publish one device's director document; False (logged) if the broker failed."""
        assert self.publisher is not None
        try:
            doc = self.signer.issue(ref, device_id=dev, ttl=self.config.document_ttl, rollout_id=rid,
                                    reason=reason)
            self.publisher.publish_desired(device_id=dev, document=doc)
        except FleetTransportError as exc:
            log_event(logger, "rollout.publish_failed", logging.WARNING, rollout=rid, device=dev,
                      error=str(exc))
            return False
        return True

    def assign(self, rid: str, rt: RolloutRuntime, cfg: StrategyConfig, rows: list[DeviceProgress],
               stage: int, now: float, labels: dict[str, dict[str, str]]) -> int:
        """Send `rows` their forward documents (until the broker fails); returns how many went."""
        if self.publisher is None or not rows:
            return 0
        ref = self.repository.target_ref(rt.target_path)
        shadow = self.version_ref(cfg.shadow_model_version_id) if cfg.shadow_model_version_id else None
        reports = self.records.reported_states([r.device_id for r in rows])
        deltas = self._deltas(ref, [rep.active_bundle for rep in reports.values()])
        if deltas is None:  # being built off the tick: this rollout's devices wait a tick or two
            return 0
        published: list[str] = []
        # Signed in batches: one sequence transaction per batch, not one per device (issue 11).
        for i in range(0, len(rows), ASSIGN_BATCH):
            batch = [r.device_id for r in rows[i:i + ASSIGN_BATCH]]
            windows: dict[str, UpdateWindows] = {}  # each device's maintenance windows, if any
            chosen = {}  # the delta from each device's active bundle, for agents that apply deltas
            for dev in batch:
                rep = reports.get(dev, NO_REPORT)
                delta = deltas.get(rep.active_bundle or "") if "delta" in rep.features else None
                if delta is not None:
                    chosen[dev] = delta
                timed = windows_for(cfg.windows, labels.get(dev, {}))
                if timed is not None:
                    windows[dev] = timed
            docs = self.signer.issue_many(ref, batch, shadow=shadow, ttl=self.config.document_ttl,
                                          rollout_id=rid, reason=f"rollout {rid} stage {stage}",
                                          deltas=chosen, windows=windows)
            sent = self._publish_batch(rid, batch, docs)
            published += sent
            if len(sent) < len(batch):
                break
        # One transaction for the batch (a stage can be a thousand devices). A crash before it
        # commits leaves them pending: the next tick sends newer documents, which is harmless.
        with self._tx():
            self.records.supersede_many(published, rid)
            ran = [(dev, reports.get(dev, NO_REPORT).active_bundle) for dev in published]
            self.records.mark_assigned(rid, ran, stage, now)
        log_event(logger, "rollout.assigned", rollout=rid, stage=stage, devices=len(published))
        return len(published)

    def _publish_batch(self, rid: str, devices: list[str], docs: list[bytes]) -> list[str]:
        """Publish signed documents until the broker fails; returns the devices that got theirs."""
        assert self.publisher is not None
        sent: list[str] = []
        for dev, doc in zip(devices, docs, strict=True):
            try:
                self.publisher.publish_desired(device_id=dev, document=doc)
            except FleetTransportError as exc:
                log_event(logger, "rollout.publish_failed", logging.WARNING, rollout=rid, device=dev,
                          error=str(exc))
                break
            sent.append(dev)
        return sent

    def _deltas(self, full: TargetRef, active_bundles: list[str | None]) -> dict[str, DeltaRef] | None:
        """Deltas to `full` from what these devices run (built once per base); {} when disabled,
        None while they are being built."""
        if self.deltas is None:
            return {}
        try:
            return self.deltas.for_devices(full, bundle_index(self.repository), active_bundles)
        except FleetError as exc:  # an optimisation: never let it stop a rollout
            log_event(logger, "rollout.deltas_failed", logging.WARNING, target=full.path, error=str(exc))
            return {}
