"""Shared pieces of the routers: store and collaborator access, pagination, idempotent creates,
error mapping.

The routes get the service's collaborators (TUF repository, publisher, drift monitor) from
`ApiCollaborators`, which `fleet serve` fills with the objects it built once
(`fleet/components.py`) and `create_app` keeps in the app's state; nothing is looked up among
running components or rebuilt per request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fleet.access.auth import Principal
from fleet.db.rows import dumps
from fleet.delivery.publisher import Publisher
from fleet.errors import AuthError, Conflict, FleetInputError, FleetMisuseError, NotFound
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.monitor import DriftMonitor
from fleet.trust.repository import Repository

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 200


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_settings(request: Request) -> FleetSettings:
    settings: FleetSettings = request.app.state.settings
    return settings


@dataclass(frozen=True)
class ApiCollaborators:
    """What the routes use beyond the store and the settings, built once by `fleet serve`.

    The API alone (tests, the OpenAPI export) gets none: `create_app` then opens the TUF
    repository from the settings once, the telemetry routes open their stores on first use,
    and routes that need the publisher report that none runs.
    """

    repository: Repository | None = None
    publisher: Publisher | None = None
    monitor: DriftMonitor | None = None  # also brings the telemetry store and the alert manager


def get_collaborators(request: Request) -> ApiCollaborators:
    collaborators: ApiCollaborators = request.app.state.collaborators
    return collaborators


def get_repository(request: Request) -> Repository:
    """The app's one TUF repository object (the service's, or opened once by `create_app`)."""
    repository: Repository = request.app.state.repository
    return repository


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[FleetSettings, Depends(get_settings)]
CollaboratorsDep = Annotated[ApiCollaborators, Depends(get_collaborators)]
RepositoryDep = Annotated[Repository, Depends(get_repository)]


@dataclass(frozen=True)
class PageParams:
    limit: int
    cursor: str | None


def page_params(
    settings: SettingsDep,
    limit: Annotated[int | None, Query(ge=1, description="Page size (server maximum applies).")] = None,
    cursor: Annotated[str | None, Query(max_length=256, description="`next_cursor` of the previous page.")]
    = None,
) -> PageParams:
    """Validate the page size against the server's maximum (422 naming `query.limit`)."""
    lim = settings.limits
    if limit is not None and limit > lim.max_page_size:
        raise RequestValidationError([{
            "loc": ("query", "limit"), "type": "less_than_equal",
            "msg": f"Input should be less than or equal to {lim.max_page_size}", "input": limit,
        }])
    return PageParams(limit or lim.default_page_size, cursor)


Paging = Annotated[PageParams, Depends(page_params)]


def idempotent_create(
    request: Request,
    principal: Principal,
    body: BaseModel,
    response_model: type[BaseModel],
    create: Callable[[], Any],
    status_code: int = 201,
) -> JSONResponse:
    """Run `create` once per (actor, Idempotency-Key); replay its first response afterwards.

    The same key with a different body or route answers 409. Failed creates are not stored,
    so a client may retry them with the same key.

    Raises `Conflict` (the key was used for another request), `RequestValidationError` (a malformed key)
    and whatever `create` raises.
    """
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return JSONResponse(response_model.model_validate(create()).model_dump(mode="json"), status_code)
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise RequestValidationError([{
            "loc": ("header", IDEMPOTENCY_HEADER), "type": "value_error", "input": key,
            "msg": f"must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters",
        }])
    store = get_store(request)
    route = f"{request.method} {request.url.path}"
    request_hash = hashlib.sha256((route + "\n" + dumps(body.model_dump(mode="json"))).encode()).hexdigest()
    # Look-up, create and stored response happen in one transaction under the store's lock:
    # concurrent duplicates serialise, and a crash cannot keep a create without its response.
    with store.tx():
        first = store.idempotency.get(principal.actor, key)
        if first is not None:
            if first.request_hash != request_hash:
                raise Conflict(f"{IDEMPOTENCY_HEADER} {key!r} was already used for a different request "
                               f"({first.route})")
            return JSONResponse(first.response, first.status_code,
                                headers={"Idempotent-Replayed": "true"})
        payload = response_model.model_validate(create()).model_dump(mode="json")
        store.idempotency.save(principal.actor, key, route, request_hash, status_code, payload)
    return JSONResponse(payload, status_code)


def install_error_handlers(app: FastAPI) -> None:
    """Map the fleet's error hierarchy to HTTP: the message is the detail, never a traceback."""

    def handler(status: int, headers: dict[str, str] | None = None) -> Callable[..., Any]:
        async def _h(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status, headers=headers)
        return _h

    app.add_exception_handler(NotFound, handler(404))
    app.add_exception_handler(Conflict, handler(409))
    app.add_exception_handler(AuthError, handler(401, {"WWW-Authenticate": "Bearer"}))
    app.add_exception_handler(FleetInputError, handler(422))
    app.add_exception_handler(FleetMisuseError, handler(503))
