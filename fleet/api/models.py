"""Model registry routes: models, immutable versions, stages, MLflow import."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fleet.access.auth import Operator, Viewer
from fleet.api.bundles import confined_file, initialised
from fleet.api.deps import Paging, RepositoryDep, SettingsDep, StoreDep, idempotent_create
from fleet.api.error_shape import field_error
from fleet.api.schemas import (
    BundleTarget,
    MlflowImport,
    ModelCreate,
    ModelOut,
    PageOf,
    StageChange,
    StageHistoryOut,
    StageName,
    VersionCreate,
    VersionOut,
)
from fleet.db.paging import Page
from fleet.errors import FleetInputError
from fleet.registry.mlflow_import import import_mlflow_model, load_reference, resolve_import_path
from fleet.registry.versions import Model, ModelVersion, StageHistoryEntry

router = APIRouter(prefix="/v1/models", tags=["models"])
_CONFLICT: dict[int | str, dict[str, Any]] = {
   409: {"description": "Already exists / refused transition / idempotency key reused"},
}


@router.get("", response_model=PageOf[ModelOut], summary="List models")
def list_models(_: Viewer, store: StoreDep, page: Paging) -> Page[Model]:
    return store.models.list_models(page.cursor, page.limit)


@router.post("", response_model=ModelOut, status_code=201, responses=_CONFLICT, summary="Create a model")
def create_model(body: ModelCreate, request: Request, store: StoreDep, who: Operator) -> JSONResponse:
    return idempotent_create(request, who, body, ModelOut,
                             lambda: store.models.create_model(body.name, body.description, who.actor))


@router.post("/import-mlflow", response_model=VersionOut, status_code=201, responses=_CONFLICT,
             summary="Register a version from an MLflow model directory on the server")
def import_mlflow(body: MlflowImport, request: Request, store: StoreDep, settings: SettingsDep,
                  repo: RepositoryDep, who: Operator) -> JSONResponse:
    try:
        path = resolve_import_path(settings.import_dir, body.path)
    except FleetInputError as exc:  # every refusal here is about that one field: name it
        raise field_error(("body", "path"), str(exc), body.path) from None
    if body.reference_data is not None and body.no_profile:
        raise field_error(("body", "no_profile"), "no_profile and reference_data exclude each other", True)
    build = body.reference_data is not None or body.no_profile
    ref_path = (None if body.reference_data is None
                else confined_file(settings.import_dir, body.reference_data, "reference_data"))

    def run() -> ModelVersion:
        reference = None if ref_path is None else load_reference(ref_path)
        return import_mlflow_model(store, path, body.model, body.version, who.actor,
                                   settings.limits.max_upload_bytes,
                                   repo=initialised(repo) if build else None,
                                   reference=reference, no_profile=body.no_profile,
                                   root=settings.import_dir, scratch=settings.data_dir)

    return idempotent_create(request, who, body, VersionOut, run)


@router.get("/{name}", response_model=ModelOut, summary="Read a model")
def get_model(name: str, store: StoreDep, _: Viewer) -> Model:
    return store.models.get_model(name)


@router.get("/{name}/versions", response_model=PageOf[VersionOut], summary="List a model's versions")
def list_versions(name: str, _: Viewer, store: StoreDep, page: Paging,
                  stage: StageName | None = None) -> Page[ModelVersion]:
    return store.models.list_versions(name, page.cursor, page.limit, stage)


@router.post("/{name}/versions", response_model=VersionOut, status_code=201, responses=_CONFLICT,
             summary="Register an immutable version")
def create_version(name: str, body: VersionCreate, request: Request, store: StoreDep,
                   who: Operator) -> JSONResponse:
    return idempotent_create(request, who, body, VersionOut, lambda: store.models.register_version(
        name, body.version, body.artifact_digest, body.runtime,
        body.lineage.model_dump(mode="json", exclude_none=True), who.actor, body.bundle_target))


@router.get("/{name}/versions/{version}", response_model=VersionOut, summary="Read a version")
def get_version(name: str, version: str, store: StoreDep, _: Viewer) -> ModelVersion:
    return store.models.get_version(name, version)


@router.post("/{name}/versions/{version}/stage", response_model=VersionOut, responses=_CONFLICT,
             summary="Move a version to another stage (archived is final)")
def set_stage(name: str, version: str, body: StageChange, store: StoreDep, who: Operator) -> ModelVersion:
    return store.models.set_stage(name, version, body.stage, who.actor, body.note)


@router.put("/{name}/versions/{version}/bundle-target", response_model=VersionOut, responses=_CONFLICT,
            summary="Record the TUF target path of the version's bundle (once)")
def set_bundle_target(name: str, version: str, body: BundleTarget, store: StoreDep,
                      who: Operator) -> ModelVersion:
    return store.models.set_bundle_target(name, version, body.bundle_target, who.actor)


@router.get("/{name}/versions/{version}/history", response_model=list[StageHistoryOut],
            summary="Stage history of a version")
def stage_history(name: str, version: str, store: StoreDep, _: Viewer) -> list[StageHistoryEntry]:
    return store.models.stage_history(name, version)
