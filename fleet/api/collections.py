"""Data collection routes: ask a cohort for a sample, follow it, stop it; read and export the
dataset versions it produced (issue 13, docs/telemetry.md *Data collection*).

`POST /v1/collections` (operator) stores the request; the collection driver (`fleet serve`'s
controller role) signs the policy into the matching devices' director documents. Viewers read
collections and dataset versions and export a version as `.npz` (Parquet is not offered:
pyarrow is not a dependency). Every change is in the audit log.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from fleet.access.auth import Operator, Viewer
from fleet.api.deps import StoreDep
from fleet.collection.records import Collection, CollectionStore, make_policy, new_collection_id
from fleet.devices.selector import MAX_SELECTOR_LEN, parse_selector
from fleet.errors import NotFound
from fleet.registry.datasets import DatasetStore, DatasetVersion
from fleet.settings import FleetSettings

router = APIRouter(tags=["collections"])
_LOCK = threading.Lock()


class CollectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(min_length=1, max_length=128)]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    selector: Annotated[str, Field(max_length=MAX_SELECTOR_LEN, description="device label selector")] = ""
    strategy: Literal["reservoir", "low_confidence"] = "reservoir"
    max_rows: Annotated[int, Field(ge=1, le=100_000)] = 1000
    max_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 4 * 1024 * 1024
    max_seconds: Annotated[int, Field(ge=1, le=7 * 86400)] = 3600
    only_while_drift: bool = False
    chunk_bytes: Annotated[int, Field(ge=1024, le=192 * 1024)] = 64 * 1024
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0


def _stores(request: Request) -> tuple[DatasetStore, CollectionStore]:
    """The dataset and collection stores of the app, opened once from the settings."""
    app = request.app
    with _LOCK:
        got: tuple[DatasetStore, CollectionStore] | None = getattr(app.state, "collection_stores", None)
        if got is None:
            settings: FleetSettings = app.state.settings
            datasets = DatasetStore(settings.telemetry_database)
            got = (datasets, CollectionStore(datasets.database, time.time))
            app.state.collection_stores = got
    return got


def close_stores(app: FastAPI) -> None:
    """Close the stores `_stores` opened (at the app's shutdown)."""
    with _LOCK:
        got: tuple[DatasetStore, CollectionStore] | None = getattr(app.state, "collection_stores", None)
        app.state.collection_stores = None
    if got is not None:
        got[0].close()


def _version(v: DatasetVersion) -> dict[str, Any]:
    return {"dataset_id": v.dataset_id, "policy_id": v.policy_id, "device_id": v.device_id,
            "sha256": v.sha256,
            "rows": v.rows, "columns": v.columns, "bytes": v.bytes, "provenance": v.provenance,
            "labelled": v.labelled, "created_at": v.created_at}


@router.post("/v1/collections", status_code=201, summary="Ask devices of a cohort to collect a sample")
def create_collection(body: CollectionIn, request: Request, store: StoreDep, who: Operator) -> dict[str, Any]:
    parse_selector(body.selector)  # a clear 400 before anything is stored
    store.models.get_version(body.model, body.version)  # 404 for an unknown model version
    cid = new_collection_id()
    fields = body.model_dump(exclude={"model", "version", "selector"})
    policy = make_policy(cid, **fields)
    c = _stores(request)[1].create(body.model, body.version, body.selector, policy, who.actor)
    store.audit.record(who.actor, "collection.create", f"collections/{cid}", None, c.to_dict())
    return c.to_dict()


@router.get("/v1/collections", summary="List collections")
def list_collections(request: Request, _: Viewer) -> list[dict[str, Any]]:
    return [c.to_dict() for c in _stores(request)[1].list()]


@router.get("/v1/collections/{collection_id}", summary="Read a collection and its dataset versions")
def get_collection(collection_id: str, request: Request, _: Viewer) -> dict[str, Any]:
    datasets, collections = _stores(request)
    c: Collection = collections.get(collection_id)
    return {**c.to_dict(), "datasets": [_version(v) for v in datasets.versions(collection_id)]}


@router.delete("/v1/collections/{collection_id}", summary="Stop a collection (withdraw the policy)")
def stop_collection(collection_id: str, request: Request, store: StoreDep, who: Operator) -> dict[str, Any]:
    collections = _stores(request)[1]
    before = collections.get(collection_id)
    after = collections.stop(collection_id)
    store.audit.record(who.actor, "collection.stop", f"collections/{collection_id}", before.to_dict(),
                       after.to_dict())
    return after.to_dict()


@router.get("/v1/datasets", summary="List dataset versions (of one collection with ?collection=)")
def list_datasets(request: Request, _: Viewer, collection: str | None = None) -> list[dict[str, Any]]:
    return [_version(v) for v in _stores(request)[0].versions(collection)]


@router.get("/v1/datasets/{dataset_id}", summary="Read a dataset version")
def get_dataset(dataset_id: str, request: Request, _: Viewer) -> dict[str, Any]:
    for v in _stores(request)[0].versions():
        if v.dataset_id == dataset_id:
            return _version(v)
    raise NotFound(f"no dataset version {dataset_id!r}")


@router.get("/v1/datasets/{dataset_id}/export", summary="Export a dataset version as .npz",
            response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
def export_dataset(dataset_id: str, request: Request, _: Viewer) -> Response:
    data = _stores(request)[0].export_npz(dataset_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{dataset_id}.npz"'})
