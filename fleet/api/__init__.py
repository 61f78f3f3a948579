"""The fleet's admin API: `create_app(settings)` builds the FastAPI application.

Every route needs an API key (`Authorization: Bearer efk_...`) except `/health`, `/docs`
and `/openapi.json`; `/v1/enroll` takes an enrollment token instead. See docs/fleet-api.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from fleet.api import (
    audit,
    bundles,
    devices,
    enrollment,
    experiments,
    health,
    keys,
    metrics_route,
    models,
    rollout_commands,
    rollouts,
    telemetry,
)
from fleet.api.deps import forget_stored_secrets, install_error_handlers
from fleet.db.store import Clock, Store
from fleet.settings import FleetSettings

API_VERSION = "1.0.0"


class BodyLimit(BaseHTTPMiddleware):
    """Refuse request bodies above the configured limit before reading them (413)."""

    def __init__(self, app: object, max_bytes: int) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self.max_bytes = max_bytes

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return JSONResponse({"detail": f"request body larger than {self.max_bytes} bytes"}, 413)
        return await call_next(request)


def create_app(settings: FleetSettings, store: Store | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the API over `store` (opened from `settings.db_path` when not given).

    A store the app opened itself is closed when the app shuts down; a store passed in
    belongs to the caller (the `FleetService` or a test).
    """
    owned = store is None
    if store is None:
        kwargs = {"clock": clock} if clock is not None else {}
        store = Store(settings.db_path, busy_timeout_ms=settings.limits.sqlite_busy_timeout_ms, **kwargs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.idempotency.purge(settings.limits.idempotency_ttl_seconds)
        forget_stored_secrets(store)  # plaintext an older version kept in replay records
        yield
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
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    install_error_handlers(app)
    for module in (health, bundles, models, devices, enrollment, rollouts, rollout_commands, experiments,
                   keys, audit, telemetry):
        app.include_router(module.router)
    metrics_route.install(app)  # GET /metrics and the request metrics middleware
    return app
