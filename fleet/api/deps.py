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
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleet.access.auth import API_KEY_PREFIX, TOKEN_PREFIX, Principal
from fleet.api.error_shape import error_response
from fleet.db.rows import dumps
from fleet.delivery.acked_stream import AckedStream
from fleet.delivery.publisher import Publisher
from fleet.errors import AuthError, Conflict, FleetInputError, FleetMisuseError, NotFound
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.telemetry.monitor import DriftMonitor
from fleet.trust.repository import Repository

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 200
REPLAY_NOTE = ("this is a replay: the {field} was shown once, in the response that created it, and is not "
               "stored, so it cannot be shown again (create a new one if it was lost)")


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
    streams: tuple[AckedStream, ...] = ()  # the ingest role's acked streams (/metrics reads their counters)


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
    shown_once: str | None = None,
) -> JSONResponse:
    """Run `create` once per (actor, Idempotency-Key); replay its first response afterwards.

    The same key with a different body or route answers 409. Failed creates are not stored,
    so a client may retry them with the same key. `shown_once` names the response field
    holding a secret shown once (an API key, an enrollment token): it is never stored, so a
    replay answers the record with that field null and `secret_note` saying why.

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
            replay = dict(first.response)
            if shown_once is not None:
                replay |= {shown_once: None, "secret_note": REPLAY_NOTE.format(field=shown_once)}
            return JSONResponse(replay, first.status_code, headers={"Idempotent-Replayed": "true"})
        payload = response_model.model_validate(create()).model_dump(mode="json")
        kept = {k: v for k, v in payload.items() if k != shown_once}
        if any(map(is_secret, kept.values())):  # a route that forgot its shown_once
            raise FleetMisuseError(f"{route}: refusing to store a secret in an idempotency record")
        store.idempotency.save(principal.actor, key, route, request_hash, status_code, kept)
    return JSONResponse(payload, status_code)


def is_secret(value: Any) -> bool:
    """Whether `value` is a plaintext API key or enrollment token (their prefixes say so)."""
    return isinstance(value, str) and value.startswith((API_KEY_PREFIX, TOKEN_PREFIX))


def forget_stored_secrets(store: Store) -> int:
    """Remove plaintext secrets older versions stored in replay records (run at start-up)."""
    return store.idempotency.scrub(is_secret)


def install_error_handlers(app: FastAPI) -> None:
    """Map the fleet's error hierarchy to HTTP: the message is the detail, never a traceback.

    Every error has the one shape of `fleet/api/error_shape.py`, HTTP exceptions (401, 403,
    404 for unknown routes, 405, 413) included.
    """

    def handler(status: int, headers: dict[str, str] | None = None,
                loc: tuple[str, ...] = ()) -> Callable[..., Any]:
        async def _h(request: Request, exc: Exception) -> JSONResponse:
            return error_response(status, str(exc), loc, headers=headers)
        return _h

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, list):  # already in the shape
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
        loc = {401: ("header", "Authorization"), 403: ("header", "Authorization"),
               400: ("body",), 413: ("body",)}.get(exc.status_code, ())
        return error_response(exc.status_code, str(exc.detail), loc, headers=dict(exc.headers or {}))

    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, handler(404))
    app.add_exception_handler(Conflict, handler(409))
    app.add_exception_handler(AuthError, handler(401, {"WWW-Authenticate": "Bearer"},
                                                ("header", "Authorization")))
    app.add_exception_handler(FleetInputError, handler(422))
    app.add_exception_handler(FleetMisuseError, handler(503))
