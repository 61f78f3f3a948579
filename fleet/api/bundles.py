"""Bundle publishing routes: register a model version from a built bundle.

`POST /v1/models/{name}/versions/from-bundle` takes a path on the server (inside the import
directory, like the MLflow import); `POST /v1/models/{name}/versions/upload` takes the bundle
as the raw request body (`application/octet-stream`), streamed to a file under the data
directory and bounded by `max_upload_bytes` (413 above it, chunked or not). Both check the
bundle, add it to the TUF repository as a target and record the target in the version.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StringConstraints
from starlette.concurrency import run_in_threadpool

from fleet.access.auth import Operator
from fleet.api.deps import RepositoryDep, SettingsDep, StoreDep, idempotent_create
from fleet.api.error_shape import field_error
from fleet.api.schemas import VersionOut
from fleet.db.files import secure_dir
from fleet.errors import FleetInputError
from fleet.registry.publish import publish_bundle
from fleet.trust.repository import Repository

router = APIRouter(prefix="/v1/models", tags=["models"])
_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "The version already exists"},
    422: {"description": "Not a valid bundle, or a bundle of another model"},
}


class BundleImport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Annotated[str, StringConstraints(min_length=1, max_length=1000)]


def initialised(repo: Repository) -> Repository:
    if not repo.initialized:
        raise FleetInputError("the fleet's TUF repository is not initialised (start `edgefleet fleet serve`)")
    return repo


def confined_file(import_dir: Path, requested: str, field: str = "path") -> Path:
    """`requested` inside the import directory; any invalid path is a 422 naming `body.<field>`."""
    root = import_dir.resolve()
    try:
        path = (root / requested).resolve()
        inside = root in path.parents and path.is_file()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise field_error(("body", field), f"{field} {requested!r} is not a usable path: {reason}",
                          requested) from None
    if not inside:
        raise field_error(("body", field), f"{field} {requested!r} is not a file inside the import directory",
                          requested)
    return path


@router.post("/{name}/versions/from-bundle", response_model=VersionOut, status_code=201,
             responses=_RESPONSES, summary="Register a version from a bundle file on the server")
def version_from_bundle(name: str, body: BundleImport, request: Request, store: StoreDep,
                        settings: SettingsDep, repo: RepositoryDep, who: Operator) -> JSONResponse:
    path = confined_file(settings.import_dir, body.path)
    return idempotent_create(request, who, body, VersionOut,
                             lambda: publish_bundle(store, initialised(repo), path, name, who.actor))


@router.post("/{name}/versions/upload", response_model=VersionOut, status_code=201, responses=_RESPONSES,
             summary="Register a version from an uploaded bundle (raw body)",
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}, "required": True}})
async def version_from_upload(name: str, request: Request, store: StoreDep, settings: SettingsDep,
                              repo: RepositoryDep, who: Operator) -> JSONResponse:
    limit = settings.limits.max_upload_bytes  # the body limit middleware allows this route as much
    secure_dir(settings.data_dir)
    with tempfile.TemporaryDirectory(prefix="upload-", dir=settings.data_dir) as tmp:
        dest, size = Path(tmp) / "bundle.efb", 0
        with dest.open("wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"bundle upload larger than {limit} bytes")
                out.write(chunk)
        if size == 0:
            raise FleetInputError("empty upload: send the bundle as the request body")
        row = await run_in_threadpool(publish_bundle, store, initialised(repo), dest, name, who.actor)
    return JSONResponse(VersionOut.model_validate(row).model_dump(mode="json"), 201)
