"""View models of the fleet overview, the device pages and the model registry pages.

Each function reads what the store (and, for bundles, the TUF repository) already holds and
returns the store's typed records, or small frozen records of this module that pair one with
the figures a page adds (`DeviceSummary`, `ModelSummary`, ...), inside the templates' context
dicts; nothing here writes. Counts over devices run in the database (one JSON key of the
reported state and labels, one GROUP BY each), so the overview costs the same few queries
whatever the fleet's size.

What the store does not keep is said, not invented: device events (installed, rolled_back,
...) are consumed by the rollout controller and not stored, so "recent events" are the audit
log's entries and a device's events are its rollout progress; telemetry is merged per cohort,
never per device; a reported state names the active and previous bundle, not a staged one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract.bundle import read_manifest
from agent.contract.manifest import Manifest, Quantization
from agent.errors import EdgefleetError
from fleet.db.audit import AuditEntry
from fleet.db.rows import decode_row
from fleet.db.sql import json_field, json_pairs
from fleet.devices.inventory import Device
from fleet.devices.selector import parse_selector
from fleet.errors import FleetError
from fleet.registry.versions import Model, ModelVersion
from fleet.rollouts.machine import RolloutState
from fleet.rollouts.store import ROLLOUT_JSON, Rollout, record_from_row
from fleet.store import Store
from fleet.telemetry.monitor import BundleProfiles

MAX_LIST = 200
RECENT_EVENTS = 15


@dataclass(frozen=True)
class DeviceSummary:
    """A device of the devices list with the two facts of its last report the list shows."""

    device: Device
    state: str | None
    active_bundle: str | None


@dataclass(frozen=True)
class DeviceRollout:
    """A device's row in one rollout: its status there, the rollout's state, the controller's outcome."""

    rollout_id: str
    stage: int
    status: str
    updated_at: str
    model_version_id: str
    state: RolloutState
    outcome: str | None
    detail: str | None
    from_bundle: str | None


@dataclass(frozen=True)
class VersionSummary:
    """A model version with its bundle's size and quantization and how many devices run it."""

    version: ModelVersion
    running: int
    bundle_bytes: int | None
    quantization: Quantization | None


@dataclass(frozen=True)
class ModelSummary:
    """A model with its versions, newest first."""

    model: Model
    versions: list[VersionSummary]


def _grouped(store: Store, column: str, key: str, where: str = "revoked = 0") -> list[dict[str, Any]]:
    """Devices counted by the text at `key` of JSON `column` ('' when absent), largest first."""
    with store.read() as db:
        expr = f"coalesce({json_field(db.dialect, column, key)}, '')"
        rows = db.execute(f"SELECT {expr} AS k, count(*) AS n FROM devices WHERE {where} "  # noqa: S608
                          "GROUP BY k ORDER BY n DESC, k LIMIT 100").fetchall()
    return [{"key": k, "count": int(n)} for k, n in rows]


def bundle_versions(store: Store) -> dict[str, tuple[str, str]]:
    """Bundle id (`name-version`, as devices report it) -> (model, version) of every version."""
    with store.read() as db:
        rows = db.execute("SELECT model_name, version FROM model_versions").fetchall()
    return {f"{m}-{v}": (m, v) for m, v in rows}


def fleet_counts(store: Store) -> dict[str, Any]:
    """Devices by active bundle, lifecycle state, cohort, label and online flag; rollouts by state."""
    with store.read() as db:
        total, online, revoked = db.execute(
            "SELECT count(*), coalesce(sum(CASE WHEN online = 1 AND revoked = 0 THEN 1 ELSE 0 END), 0), "
            "coalesce(sum(revoked), 0) FROM devices").one()
        labels = db.execute(
            f"SELECT j.key, j.value, count(*) FROM devices d, {json_pairs(db.dialect, 'd.labels', 'j')} "  # noqa: S608
            "WHERE d.revoked = 0 GROUP BY j.key, j.value ORDER BY j.key, j.value LIMIT 100").fetchall()
        rollouts = db.execute("SELECT state, count(*) FROM rollouts GROUP BY state ORDER BY state").fetchall()
    versions = bundle_versions(store)
    by_bundle = _grouped(store, "reported_state", "active_bundle")
    for row in by_bundle:
        row["version"] = versions.get(row["key"])
    return {
        "total": int(total), "online": int(online), "offline": int(total) - int(online) - int(revoked),
        "revoked": int(revoked), "by_bundle": by_bundle,
        "by_state": _grouped(store, "reported_state", "state"),
        "by_cohort": _grouped(store, "labels", "cohort"),
        "labels": [{"key": k, "value": v, "count": int(n)} for k, v, n in labels],
        "rollouts": [{"state": s, "count": int(n)} for s, n in rollouts],
    }


def recent_events(store: Store, limit: int = RECENT_EVENTS) -> list[AuditEntry]:
    """The newest audit entries: every change an operator, the CLI or the controller made."""
    return store.audit.list(None, limit).items


def device_page(store: Store, selector: str, online: bool | None, cursor: str | None,
                limit: int) -> dict[str, Any]:
    """One page of devices matching a label selector (the API's syntax). Raises FleetInputError."""
    page = store.devices.list_devices(parse_selector(selector), cursor, limit, online, None)
    return {"items": [device_summary(d) for d in page.items], "next_cursor": page.next_cursor}


def device_summary(d: Device) -> DeviceSummary:
    reported = d.reported_state or {}
    return DeviceSummary(d, reported.get("state"), reported.get("active_bundle"))


def device_rollouts(store: Store, device_id: str) -> list[DeviceRollout]:
    """The device's rows in every rollout it was part of, newest rollout first."""
    with store.read() as db:
        rows = list(db.query(
            "SELECT d.rollout_id, d.stage, d.status, d.updated_at, r.model_version_id, r.state, "
            "p.outcome, p.detail, p.from_bundle FROM rollout_devices d "
            "JOIN rollouts r ON r.id = d.rollout_id "
            "LEFT JOIN rollout_progress p ON p.rollout_id = d.rollout_id AND p.device_id = d.device_id "
            "WHERE d.device_id = :device ORDER BY r.created_at DESC LIMIT 50", {"device": device_id}))
    return [record_from_row(DeviceRollout, r, state=RolloutState(r["state"])) for r in rows]


def device_detail(store: Store, device_id: str) -> dict[str, Any]:
    """A device with its bundles, last reported state, rollout progress and audit entries.

    Raises NotFound."""
    device = store.devices.get(device_id)
    reported = device.reported_state or {}
    versions = bundle_versions(store)
    return {
        "device": device, "reported": reported,
        "active": reported.get("active_bundle"), "previous": reported.get("previous_bundle"),
        "active_version": versions.get(reported.get("active_bundle") or ""),
        "previous_version": versions.get(reported.get("previous_bundle") or ""),
        "rollouts": device_rollouts(store, device_id),
        "audit": store.audit.list(None, 20, resource=f"devices/{device_id}").items,
        "cohort": device.labels.get("cohort"),
    }


class BundleInfo:
    """Manifests of published bundles, read from the repository once (versions are immutable).

    `profiles` locates a version's bundle in the app's one TUF repository (built once, by
    `install_dashboard`)."""

    def __init__(self, profiles: BundleProfiles) -> None:
        self.profiles = profiles
        self._cache: dict[tuple[str, str], tuple[Manifest, int, Path] | None] = {}
        self._lock = threading.Lock()

    def get(self, model: str, version: str) -> tuple[Manifest, int, Path] | None:
        """(manifest, bundle bytes, path) of the version's bundle, or None when there is none."""
        with self._lock:
            if (model, version) in self._cache:
                return self._cache[(model, version)]
        path = self.profiles.bundle_path(model, version)
        found: tuple[Manifest, int, Path] | None = None
        if path is not None:
            try:
                found = (read_manifest(path), path.stat().st_size, path)
            except (EdgefleetError, OSError):
                found = None
        with self._lock:
            if found is not None:  # a miss is retried: the bundle may be published later
                self._cache[(model, version)] = found
        return found


def _running(store: Store) -> dict[str, int]:
    rows = _grouped(store, "reported_state", "active_bundle")
    return {r["key"]: r["count"] for r in rows}


def models_page(store: Store, bundles: BundleInfo) -> list[ModelSummary]:
    """Every model with its versions (newest first): stage, runtime, bundle size, quantization,
    and how many devices report it active."""
    running = _running(store)
    out = []
    for model in store.models.list_models(None, MAX_LIST).items:
        versions = []
        for v in reversed(store.models.list_versions(model.name, None, MAX_LIST).items):
            info = bundles.get(model.name, v.version)
            versions.append(VersionSummary(v, running.get(f"{model.name}-{v.version}", 0),
                                           info[1] if info else None,
                                           info[0].quantization if info else None))
        out.append(ModelSummary(model, versions))
    return out


def version_rollouts(store: Store, version_id: str) -> list[Rollout]:
    """The rollouts of a model version, newest first."""
    with store.read() as db:
        rows = db.query("SELECT * FROM rollouts WHERE model_version_id = :vid "
                        "ORDER BY created_at DESC LIMIT 50", {"vid": version_id})
    return [Rollout.from_row(decode_row(r, ROLLOUT_JSON) or r) for r in rows]


def version_detail(store: Store, bundles: BundleInfo, model: str, version: str) -> dict[str, Any]:
    """A version's lineage, quantization gate figures, bundle, stage history, rollouts, devices.

    Raises NotFound."""
    row = store.models.get_version(model, version)
    info = bundles.get(model, version)
    manifest = info[0] if info else None
    return {
        "version": row, "lineage": row.lineage, "manifest": manifest,
        "bundle_bytes": info[1] if info else None,
        "quantization": manifest.quantization if manifest else None,
        "history": store.models.stage_history(model, version), "rollouts": version_rollouts(store, row.id),
        "running": _running(store).get(f"{model}-{version}", 0),
    }


def safe_models_page(store: Store, bundles: BundleInfo) -> tuple[list[ModelSummary], str]:
    """`models_page`, or an empty list and the reason when the repository cannot be read."""
    try:
        return models_page(store, bundles), ""
    except FleetError as exc:
        return [], str(exc)
