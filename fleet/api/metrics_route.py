"""`GET /metrics` (Prometheus text format) and the API request metrics middleware.

The endpoint needs a viewer API key by default (Prometheus sends it with
`authorization: {type: Bearer, credentials_file: ...}`), because the exposition names models,
versions, cohorts and rollouts. `metrics_public: true` in the settings
(`EDGEFLEET_METRICS_PUBLIC=1`) serves it without a key, for a scraper on a trusted network.
`install(app)` adds both the route and the middleware (one call in `create_app`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST

from fleet.access.auth import bearer, require
from fleet.api.deps import ApiCollaborators
from fleet.metrics import ApiMetrics, ApiMetricsMiddleware, FleetMetrics, MetricSources, sources_of
from fleet.settings import FleetSettings

router = APIRouter(tags=["metrics"])
_viewer = require("viewer")


def install(app: FastAPI) -> None:
    """Serve `/metrics` on `app` and count its requests (route template, status, latency).

    The collector reads the publisher and the drift monitor (with its telemetry store and alert
    manager) that `fleet serve` handed to the app (`ApiCollaborators`); without them those
    families are empty, or come from the stores the telemetry routes opened.
    """

    def sources(api: ApiMetrics) -> MetricSources:
        parts: ApiCollaborators = app.state.collaborators
        ctx = getattr(app.state, "telemetry_context", None)  # stores the telemetry routes opened
        settings: FleetSettings = app.state.settings
        return sources_of(app.state.store, api, parts.publisher, parts.monitor,
                          ctx.telemetry if ctx is not None else None, ctx.alerts if ctx is not None else None,
                          max_serving_series=settings.telemetry.max_serving_series, streams=parts.streams)

    metrics = FleetMetrics(sources)
    app.state.metrics = metrics
    app.add_middleware(ApiMetricsMiddleware, metrics=metrics.api)
    app.include_router(router)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (viewer key unless public)",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Text exposition format"}})
def metrics(request: Request,
            creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Response:
    settings: FleetSettings = request.app.state.settings
    if not settings.metrics_public:
        _viewer(request, creds)  # 401 / 403 like every other route
    body = request.app.state.metrics.render()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
