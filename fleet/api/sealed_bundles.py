"""Bundle encryption routes (operator): publish a version sealed for a cohort, re-wrap it later.

`POST /v1/models/{name}/versions/from-bundle/sealed` takes a plain bundle inside the import
directory and a device selector: the bundle is checked, encrypted, and only the ciphertext is
published (`fleet.registry.sealing.publish_sealed`). `POST /v1/models/{name}/versions/{version}/recipients`
re-wraps the content key for the devices the selector matches now (devices enrolled since, minus
revoked ones) and publishes a new recipients document; the sealed target stays the same. Both
are audited (`bundle.wrap`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from fleet.access.auth import Operator
from fleet.api.bundles import confined_file, initialised
from fleet.api.deps import RepositoryDep, SettingsDep, StoreDep
from fleet.api.schemas import VersionOut
from fleet.errors import FleetInputError
from fleet.registry.sealed_manifest import content_keys_dir
from fleet.registry.sealing import WrapResult, publish_sealed, wrap_for_cohort

router = APIRouter(prefix="/v1/models", tags=["models"])
_Selector = Annotated[str, StringConstraints(max_length=2000)]
_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "The version already exists"},
    422: {"description": "Not a valid bundle or selector, not sealed, or no device of the cohort "
                         "has a wrap key"},
}


class SealedImport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Annotated[str, StringConstraints(min_length=1, max_length=1000)]
    selector: _Selector = Field(description="device label selector of the cohort, e.g. `site=lab`")
    chunk_bytes: Annotated[int, Field(ge=4096, le=16 << 20)] = 1 << 20


class Rewrap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    selector: _Selector = Field(description="device label selector of the cohort now")


class WrapOut(BaseModel):
    bundle_target: str
    recipients_target: str
    bundle_sha256: str
    selector: str
    devices: list[str]
    without_key: list[str] = Field(description="matched devices enrolled without a wrap key (left out)")


class SealedVersionOut(BaseModel):
    version: VersionOut
    wrap: WrapOut


def _wrap_out(result: WrapResult) -> WrapOut:
    return WrapOut.model_validate(result.to_dict())


@router.post("/{name}/versions/from-bundle/sealed", response_model=SealedVersionOut, status_code=201,
             responses=_RESPONSES,
             summary="Register a version from a bundle, published encrypted for a cohort")
async def version_from_bundle_sealed(name: str, body: SealedImport, store: StoreDep, settings: SettingsDep,
                                     repo: RepositoryDep, who: Operator) -> JSONResponse:
    path = confined_file(settings.import_dir, body.path)
    version, wrap = await run_in_threadpool(
        lambda: publish_sealed(store, initialised(repo), content_keys_dir(settings.data_dir), path, name,
                               who.actor, body.selector, chunk_bytes=body.chunk_bytes))
    out = SealedVersionOut(version=VersionOut.model_validate(version), wrap=_wrap_out(wrap))
    return JSONResponse(out.model_dump(mode="json"), 201)


@router.post("/{name}/versions/{version}/recipients", response_model=WrapOut, responses=_RESPONSES,
             summary="Re-wrap a sealed version's content key for the devices a selector matches now")
async def rewrap_version(name: str, version: str, body: Rewrap, store: StoreDep, settings: SettingsDep,
                         repo: RepositoryDep, who: Operator) -> WrapOut:
    row = store.models.get_version(name, version)
    if row.bundle_target is None:
        raise FleetInputError(f"version {version!r} of {name!r} has no bundle")
    target = row.bundle_target
    result = await run_in_threadpool(
        lambda: wrap_for_cohort(store, initialised(repo), content_keys_dir(settings.data_dir), target,
                                body.selector, who.actor))
    return _wrap_out(result)
