"""Device inventory routes: list with label selectors, read, relabel, revoke, register a report key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from fleet.access.auth import Operator, Viewer
from fleet.api.deps import CollaboratorsDep, Paging, SettingsDep, StoreDep
from fleet.api.schemas import DeviceOut, LabelsIn, PageOf, ReportKeyIn, ReportKeyOut, RevokeIn, RevokeOut
from fleet.db.paging import Page
from fleet.devices.inventory import Device
from fleet.devices.report_keys import parse_public_key
from fleet.devices.revocation import revoke_device
from fleet.devices.selector import MAX_SELECTOR_LEN, parse_selector

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.get("", response_model=PageOf[DeviceOut], summary="List devices, filtered by a label selector")
def list_devices(
    store: StoreDep,
    page: Paging,
    _: Viewer,
    selector: Annotated[str, Query(max_length=MAX_SELECTOR_LEN, description=(
        "Kubernetes-style: `env=prod,region in (eu,us),tier!=edge,gpu,!legacy` (comma = AND)"))] = "",
    online: bool | None = None,
    revoked: bool | None = None,
) -> Page[Device]:
    return store.devices.list_devices(parse_selector(selector), page.cursor, page.limit, online, revoked)


@router.get("/{device_id}", response_model=DeviceOut, summary="Read a device")
def get_device(device_id: str, store: StoreDep, _: Viewer) -> Device:
    return store.devices.get(device_id)


@router.put("/{device_id}/labels", response_model=DeviceOut, summary="Replace a device's labels")
def set_labels(device_id: str, body: LabelsIn, store: StoreDep, who: Operator) -> Device:
    return store.devices.set_labels(device_id, body.labels, who.actor)


@router.post("/{device_id}/revoke", response_model=RevokeOut,
             responses={409: {"description": "Already revoked"}},
             summary="Revoke a device: drop its broker login, reload the broker, clear its desired topic")
def revoke(device_id: str, body: RevokeIn, store: StoreDep, settings: SettingsDep, who: Operator,
           parts: CollaboratorsDep) -> dict[str, Any]:
    return revoke_device(store, settings, device_id, who.actor, body.reason, parts.publisher).to_dict()


@router.put("/{device_id}/report-key", response_model=ReportKeyOut,
            responses={404: {"description": "No such device"}, 422: {"description": "Not an Ed25519 key"}},
            summary="Register or rotate a device's report signing key (audited; resets its counters)")
def set_report_key(device_id: str, body: ReportKeyIn, store: StoreDep, who: Operator) -> dict[str, Any]:
    store.report_keys.register(device_id, parse_public_key(body.public_key), who.actor)
    return {"device_id": device_id, "public_key": body.public_key,
            "counters": store.report_keys.last_counters(device_id)}
