"""Who may see and do what in the dashboard, and how pages are rendered and refused.

- A page needs a live session (`Dash`): without one, a browser is sent to the login page
  (htmx requests get `HX-Redirect`); every request re-reads the session's API key, so a
  revoked key is logged out on its next click.
- An action needs the API's role for it (`require_role`, same ranks as `fleet.access.auth`)
  and a form whose CSRF token matches the session's (`checked_form`); the session cookie is
  also `SameSite=Strict`, so a cross-site form never carries it.
- Forms are parsed here (`application/x-www-form-urlencoded`, under the API's body limit)
  rather than with python-multipart: the dashboard posts a handful of short text fields.
- Errors on `/ui/` paths become HTML pages with a sentence and a way back, never a stack
  trace or JSON; other paths keep the API's JSON handlers (`install_error_pages`). The
  dashboard's own refusals (`LoginRequired`, `Forbidden`) are `AuthError`s of the fleet's one
  error hierarchy (docs/errors.md), answered by their own handlers (a redirect, a 403 page).

Every dashboard response carries a strict Content-Security-Policy (only this origin's scripts
and styles, no inline script), `X-Frame-Options: DENY` and `Cache-Control: no-store`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.exceptions import HTTPException

from fleet.access.auth import ROLE_RANK
from fleet.dashboard.sessions import Session, SessionStore
from fleet.errors import AuthError, Conflict, FleetInputError, FleetMisuseError, NotFound
from fleet.store import Store

PREFIX = "/ui"
SESSION_COOKIE = "ef_session"
LOGIN_COOKIE = "ef_login"
MAX_FORM_BYTES = 64 * 1024
HERE = Path(__file__).resolve().parent
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
NAV = [("overview", "Fleet overview", "/ui/"), ("devices", "Devices", "/ui/devices"),
       ("models", "Models", "/ui/models"), ("rollouts", "Rollouts", "/ui/rollouts"),
       ("drift", "Drift and alerts", "/ui/drift"), ("experiments", "Experiments", "/ui/experiments"),
       ("audit", "Audit log", "/ui/audit")]


class LoginRequired(AuthError):
    """No live session: the browser goes to the login page (with `message` when there is one)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class Forbidden(AuthError):
    """The session may not do this (role too low, or the form's CSRF token is wrong): 403."""


def _fmt_time(value: Any) -> str:
    """Unix seconds or the store's ISO strings, shown to the second in UTC."""
    if value is None or value == "":
        return "—"
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return "—"
        return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    text = str(value)
    return text[:19].replace("T", " ") + "Z" if len(text) >= 19 and text[10] == "T" else text


def _fmt_num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e6 else f"{value:.{digits}f}"


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
templates.filters["ts"] = _fmt_time
templates.filters["num"] = _fmt_num
# Plain JSON for display (autoescaping then makes it HTML-safe); `tojson` escapes for scripts.
templates.filters["json"] = lambda value, indent=None: json.dumps(value, sort_keys=True, indent=indent,
                                                                   default=str, ensure_ascii=False)


def sessions_of(request: Request) -> SessionStore:
    sessions: SessionStore = request.app.state.dashboard_sessions
    return sessions


def store_of(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def current_session(request: Request) -> Session:
    """FastAPI dependency: the request's live session, its key still active. Raises LoginRequired."""
    token = request.cookies.get(SESSION_COOKIE)
    sessions = sessions_of(request)
    session = sessions.get(token)
    if session is None:
        raise LoginRequired("Your session has ended; log in again." if token else "")
    try:
        revoked = store_of(request).access.get_api_key(session.key_id).revoked
    except NotFound:
        revoked = True
    if revoked:
        sessions.delete(token)
        raise LoginRequired("The API key of this session was revoked.")
    request.state.principal = session.principal
    return session


Dash = Annotated[Session, Depends(current_session)]


def require_role(session: Session, role: str) -> None:
    """Raise Forbidden unless the session's key has `role` or higher (the API's matrix)."""
    if ROLE_RANK[session.role] < ROLE_RANK[role]:
        raise Forbidden(f"Your key's role '{session.role}' may not do this; it needs '{role}' or higher.")


async def read_form(request: Request) -> dict[str, str]:
    """The first value of each field of an urlencoded form. Raises FleetInputError."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise FleetInputError("the dashboard accepts only its own forms (application/x-www-form-urlencoded)")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise FleetInputError(f"form larger than {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise FleetInputError("the form could not be read") from None
    return {k: v[0] for k, v in fields.items()}


async def checked_form(request: Request, session: Session, role: str = "operator") -> dict[str, str]:
    """The form of an action, after the CSRF and role checks. Raises Forbidden, FleetInputError."""
    try:
        form = await read_form(request)
    except FleetInputError:
        form = {}  # not a dashboard form: refused below like a missing token
    if not session.csrf_ok(form.get("csrf")):
        raise Forbidden("This form did not come from your dashboard session (CSRF token missing or stale); "
                        "reload the page and try again.")
    require_role(session, role)
    return form


def secure(response: Response) -> Response:
    """The headers every dashboard response carries (see the module docstring)."""
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def render(request: Request, template: str, context: dict[str, Any], status: int = 200,
           session: Session | None = None) -> HTMLResponse:
    """A page (or an htmx fragment) with the shared context: session, CSRF token, navigation."""
    page = context.get("page", "")
    base = {"session": session, "csrf": session.csrf if session else "", "nav": NAV, "page": page,
            "can_act": session is not None and ROLE_RANK[session.role] >= ROLE_RANK["operator"],
            "next_page": _next_page(page), "now": time.strftime("%H:%M:%S UTC", time.gmtime()),
            "alert_destinations": _alert_destinations(request)}
    html = templates.get_template(template).render({**base, **context})
    return secure(HTMLResponse(html, status_code=status))  # type: ignore[return-value]


def _alert_destinations(request: Request) -> bool:
    """Whether alerts go anywhere (a webhook or a command): else "delivered" would mislead."""
    telemetry = request.app.state.settings.telemetry
    return bool(telemetry.webhook_url or telemetry.command)


def _next_page(page: str) -> tuple[str, str] | None:
    names = [n for n, _, _ in NAV]
    if page not in names:
        return None
    _, label, href = NAV[(names.index(page) + 1) % len(NAV)]
    return label, href


def redirect(url: str) -> Response:
    """303 See Other: after a POST the browser GETs the page (no resubmission on reload)."""
    return secure(RedirectResponse(url, status_code=303))


def safe_next(raw: str | None) -> str:
    """Where to go after login: only a dashboard path, never another site."""
    if raw and raw.startswith(PREFIX + "/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return PREFIX + "/"


def _is_ui(request: Request) -> bool:
    return request.url.path == PREFIX or request.url.path.startswith(PREFIX + "/")


def error_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    token = request.cookies.get(SESSION_COOKIE)
    session = sessions_of(request).get(token) if token else None
    return render(request, "error.html", {"title": title, "message": message, "status": status},
                  status, session)


Handler = Callable[[Request, Any], Awaitable[Response] | Response]


def install_error_pages(app: FastAPI) -> None:
    """HTML error pages for `/ui/` paths; the API's own handlers everywhere else."""

    async def login_required(request: Request, exc: LoginRequired) -> Response:
        target = f"{PREFIX}/login?next={quote(request.url.path)}"
        if exc.message:
            target += "&reason=" + ("revoked" if "revoked" in exc.message else "expired")
        if request.headers.get("hx-request"):
            return secure(Response(status_code=204, headers={"HX-Redirect": target}))
        return redirect(target)

    async def forbidden(request: Request, exc: Forbidden) -> Response:
        return error_page(request, 403, "Not allowed", str(exc))

    app.add_exception_handler(LoginRequired, login_required)  # type: ignore[arg-type]
    app.add_exception_handler(Forbidden, forbidden)  # type: ignore[arg-type]
    titles = {NotFound: (404, "Not found"), Conflict: (409, "Refused"),
              FleetInputError: (422, "Invalid input"), FleetMisuseError: (503, "Service misconfigured")}
    for exc_type, (status, title) in titles.items():
        _wrap(app, exc_type, _describe(status, title))
    _wrap(app, RequestValidationError, lambda exc: (422, "Invalid input", "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())))
    _wrap(app, HTTPException, lambda exc: (exc.status_code, "Error", str(exc.detail)))


def _describe(status: int, title: str) -> Callable[[Any], tuple[int, str, str]]:
    return lambda exc: (status, title, str(exc))


def _wrap(app: FastAPI, exc_type: type[Exception], describe: Callable[[Any], tuple[int, str, str]]) -> None:
    previous: Handler | None = app.exception_handlers.get(exc_type)

    async def handler(request: Request, exc: Exception) -> Response:
        if _is_ui(request) or previous is None:
            status, title, message = describe(exc)
            return error_page(request, status, title, message)
        result = previous(request, exc)
        return await result if isinstance(result, Awaitable) else result

    app.add_exception_handler(exc_type, handler)

