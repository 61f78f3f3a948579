"""The fleet's admin API: `create_app(settings)` builds the FastAPI application.

Every route needs an API key (`Authorization: Bearer efk_...`) except `/health`, `/docs`
and `/openapi.json`; `/v1/enroll` takes an enrollment token instead. See docs/fleet-api.md.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.api import (
    alerts,
    audit,
    bundles,
    collections,
    devices,
    enrollment,
    experiments,
    health,
    keys,
    metrics_route,
    models,
    performance,
    rollout_commands,
    rollouts,
    sealed_bundles,
    telemetry,
    training,
)
from fleet.api.deps import ApiCollaborators, forget_stored_secrets, install_error_handlers
from fleet.api.error_shape import document_errors, error_response
from fleet.settings import FleetSettings
from fleet.store import Clock, Store
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository

API_VERSION = "1.0.0"
UPLOAD_PATH = re.compile(r"^/v1/models/[^/]+/versions/upload$")  # bundles: streamed to disk


class BodyLimit:
    """Refuse request bodies above the limit with 413: by `Content-Length` before reading, and
    by counting a body sent without one (chunked) as it arrives, so no route reads more.

    Bundle uploads (`UPLOAD_PATH`) may take `upload_bytes` (the route streams them to disk);
    every other body, JSON read into memory, `max_bytes`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_bytes if UPLOAD_PATH.match(scope["path"]) else self.max_bytes
        message = f"request body larger than {limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await error_response(413, message, ("body",))(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > limit:  # raised inside the route: its handler answers 413 in the one shape
                raise HTTPException(413, message)
            return msg

        await self.app(scope, counted, send)


def create_app(settings: FleetSettings, store: Store | None = None, clock: Clock | None = None,
               collaborators: ApiCollaborators | None = None) -> FastAPI:
    """Build the API over `store` (opened from `settings.database` when not given).

    A store the app opened itself is closed when the app shuts down; a store passed in
    belongs to the caller (the `FleetService` or a test). `collaborators` are the objects
    `fleet serve` built once (`fleet/components.py`); without them the TUF repository is
    opened here from the settings, once for the app's lifetime.
    """
    owned = store is None
    if store is None:
        kwargs = {"clock": clock} if clock is not None else {}
        store = Store(settings.database, busy_timeout_ms=settings.limits.sqlite_busy_timeout_ms, **kwargs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.idempotency.purge(settings.limits.idempotency_ttl_seconds)
        forget_stored_secrets(store)  # plaintext an older version kept in replay records
        yield
        collections.close_stores(app)
        if owned:
            store.close()

    app = FastAPI(
        title="edgefleet fleet API",
        version=API_VERSION,
        description="Model registry, device inventory and enrollment, rollouts, API keys and audit log.",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.settings = settings
    app.state.collaborators = collaborators or ApiCollaborators()
    app.state.repository = app.state.collaborators.repository or Repository(settings.repo_dir,
                                                                            KeyStore(settings.keys_dir))
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes,
                       upload_bytes=settings.limits.max_upload_bytes)
    install_error_handlers(app)
    document_errors(app)  # the error statuses and their one shape, in /openapi.json
    for module in (health, bundles, models, devices, enrollment, rollouts, rollout_commands, experiments,
                   keys, audit, telemetry, alerts, performance, collections, sealed_bundles, training):
        app.include_router(module.router)
    metrics_route.install(app)  # GET /metrics and the request metrics middleware
    return app
