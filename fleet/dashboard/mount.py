"""`install_dashboard(app)`: the dashboard's routes, static assets and error pages in the API app.

Called by `FleetService` after `create_app`, so `edgefleet fleet serve` serves the dashboard
at `/ui/` on the API's own port (no second server); `/` redirects there. The API's OpenAPI
document does not list the dashboard (its routes are `include_in_schema=False`). Static
assets (htmx, the stylesheet) are files of this package (`static/`), so nothing is fetched at
run time.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from fleet.dashboard import routes_auth, routes_drift, routes_fleet, routes_misc, routes_rollouts
from fleet.dashboard.drift_views import VerdictCache
from fleet.dashboard.security import HERE, PREFIX, install_error_pages
from fleet.dashboard.sessions import SessionStore
from fleet.dashboard.views import BundleInfo
from fleet.store import Store
from fleet.telemetry.monitor import BundleProfiles
from fleet.trust.repository import Repository


def install_dashboard(app: FastAPI, sessions: SessionStore | None = None) -> None:
    """Mount the dashboard on `app`, an app of `create_app` (whose `state` holds the store, the
    settings, the collaborators and the one TUF repository, which the bundle pages read)."""
    store: Store = app.state.store
    repository: Repository = app.state.repository
    app.state.dashboard_sessions = sessions or SessionStore()
    app.state.dashboard_bundles = BundleInfo(BundleProfiles(store, repository))
    app.state.dashboard_verdicts = VerdictCache()
    for module in (routes_auth, routes_fleet, routes_rollouts, routes_drift, routes_misc):
        app.include_router(module.router)
    app.mount(PREFIX + "/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")

    def root() -> RedirectResponse:
        return RedirectResponse(PREFIX + "/", status_code=307)

    app.add_api_route("/", root, methods=["GET"], include_in_schema=False)
    install_error_pages(app)
