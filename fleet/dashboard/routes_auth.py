"""Login and logout: an API key in, a session cookie out.

The key is checked by `fleet.access.auth.authenticate`, the API's own check, and then
forgotten: the cookie holds a random session token (`sessions.SessionStore`). The cookie is
HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), Secure when
the request came over https (also behind a proxy that sets X-Forwarded-Proto, which uvicorn
honours for trusted proxies), limited to `/ui` and expires with the session.

The login form itself is protected against login CSRF (a foreign page logging the victim in
as the attacker) by a double-submit token: a short-lived cookie and the same value in the form.
A wrong key answers the login page again with a sentence (401), never a stack trace, and the
key is never logged.
"""

from __future__ import annotations

import hmac
import logging
import secrets

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from agent.logs import log_event
from fleet.access.auth import authenticate
from fleet.dashboard.security import (
    LOGIN_COOKIE,
    PREFIX,
    SESSION_COOKIE,
    Dash,
    checked_form,
    read_form,
    redirect,
    render,
    safe_next,
    sessions_of,
    store_of,
)

router = APIRouter(prefix=PREFIX, include_in_schema=False)
logger = logging.getLogger("edgefleet.fleet.dashboard")
LOGIN_TOKEN_TTL_S = 900
REASONS = {"expired": "Your session has ended; log in again.",
           "revoked": "The API key of your session was revoked; log in with another key.",
           "logout": "You are logged out."}


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int, path: str) -> None:
    response.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def _login_page(request: Request, next_path: str, message: str = "", error: str = "",
                status: int = 200) -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", {"page": "login", "login_token": token, "next": next_path,
                                              "message": message, "error": error}, status)
    _cookie(response, request, LOGIN_COOKIE, token, LOGIN_TOKEN_TTL_S, PREFIX + "/login")
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "", reason: str = "") -> Response:
    """The login page (or straight on when the browser already has a live session)."""
    if sessions_of(request).get(request.cookies.get(SESSION_COOKIE)) is not None:
        return redirect(safe_next(next))
    return _login_page(request, safe_next(next), REASONS.get(reason, ""))


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the key (the API's check), start a session, set its cookie, go where the user was going."""
    form = await read_form(request)
    next_path = safe_next(form.get("next"))
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected, form.get("login_token", "")):
        return _login_page(request, next_path, error="The login form expired or was not sent by this page; "
                           "try again.", status=400)
    key = form.get("key", "").strip()
    principal = await run_in_threadpool(authenticate, store_of(request), key) if key else None
    if principal is None:
        log_event(logger, "dashboard.login_refused", logging.WARNING, client=request.client.host
                  if request.client else "")
        return _login_page(request, next_path, error="That API key is unknown or revoked. Keys look like "
                           "efk_... (edgefleet fleet create-admin-key prints one).", status=401)
    token, session = sessions_of(request).create(principal)
    log_event(logger, "dashboard.login", key_id=principal.key_id, role=principal.role)
    response = redirect(next_path)
    _cookie(response, request, SESSION_COOKIE, token, int(session.expires_at - session.created_at), PREFIX)
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX + "/login", httponly=True, samesite="strict")
    return response


@router.post("/logout")
async def logout(request: Request, session: Dash) -> Response:
    """End the session (CSRF-checked like every POST; any role may log out)."""
    await checked_form(request, session, role="viewer")
    sessions_of(request).delete(request.cookies.get(SESSION_COOKIE))
    log_event(logger, "dashboard.logout", key_id=session.key_id)
    response = redirect(PREFIX + "/login?reason=logout")
    response.delete_cookie(SESSION_COOKIE, path=PREFIX, httponly=True, samesite="strict")
    return response
