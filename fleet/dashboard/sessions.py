"""Server-side login sessions of the dashboard.

Why server-side and random: the cookie carries only a random 256-bit token; the server keeps
its sha256 with the key's id, role and the session's CSRF token. The API key itself is used
once, at login, and is never stored or sent back, so a stolen cookie is worth one expiring
session, not a key. Every request re-reads the key's record (`touch` callers do), so revoking
the key ends its sessions at once. Sessions live in memory: a restart of the service logs
everyone out, which is the safe direction, and nothing secret is written to disk.

Bounds: a session expires `ttl_s` after login and `idle_s` after its last request; at most
`max_sessions` are kept (the oldest is dropped first), so logins cannot grow memory unbounded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from fleet.access.auth import Principal

SESSION_TTL_S = 8 * 3600.0
SESSION_IDLE_S = 3600.0
MAX_SESSIONS = 10_000
TOKEN_BYTES = 32


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Session:
    """One logged-in operator: who (the API key's id, name, role), the CSRF token, and when."""

    key_id: str
    name: str
    role: str
    csrf: str
    created_at: float
    expires_at: float
    last_seen: float

    @property
    def principal(self) -> Principal:
        """The same principal the API builds for this key, so the audit log names the same actor."""
        return Principal(self.key_id, self.name, self.role)

    def csrf_ok(self, presented: str | None) -> bool:
        """Constant-time comparison of a form's token with this session's."""
        return bool(presented) and hmac.compare_digest(str(presented), self.csrf)


class SessionStore:
    """Sessions by token digest (thread-safe; the API's routes run in a thread pool)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, idle_s: float = SESSION_IDLE_S,
                 max_sessions: int = MAX_SESSIONS, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.clock = clock
        self._by_digest: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, principal: Principal) -> tuple[str, Session]:
        """A new session for `principal`; returns (cookie token, session)."""
        now = self.clock()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        csrf = secrets.token_urlsafe(TOKEN_BYTES)
        session = Session(principal.key_id, principal.name, principal.role, csrf, now, now + self.ttl_s, now)
        with self._lock:
            self._by_digest[_digest(token)] = session
            while len(self._by_digest) > self.max_sessions:
                self._by_digest.popitem(last=False)
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session of a cookie token (its idle clock restarted), or None."""
        if not token or len(token) > 128:
            return None
        now = self.clock()
        digest = _digest(token)
        with self._lock:
            session = self._by_digest.get(digest)
            if session is None:
                return None
            if now >= session.expires_at or now - session.last_seen >= self.idle_s:
                del self._by_digest[digest]
                return None
            session = replace(session, last_seen=now)
            self._by_digest[digest] = session
            return session

    def delete(self, token: str | None) -> None:
        """End a session (logout, or its key was revoked)."""
        if token:
            with self._lock:
                self._by_digest.pop(_digest(token), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_digest)
