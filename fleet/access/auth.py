"""API keys, roles and the FastAPI dependency that enforces them.

Keys are `efk_` + 32 random bytes (256 bits, `secrets.token_urlsafe`), shown once and stored
as sha256. A slow KDF (scrypt, bcrypt) exists to stretch *low-entropy* human passwords
against offline guessing; a 256-bit random key cannot be guessed however fast the hash,
so sha256 gives the same protection while keeping per-request verification at
microseconds and letting the hash be an indexed lookup column. The same reasoning covers
enrollment tokens (`eft_` prefix). Prefixes make leaked secrets easy to grep for.

Permission matrix (a role includes every permission of the roles below it):

| action                                               | viewer | operator | admin |
|------------------------------------------------------|:------:|:--------:|:-----:|
| read models, devices, rollouts, audit log            |   yes  |    yes   |  yes  |
| create/stage models, label/revoke devices, rollouts  |        |    yes   |  yes  |
| create/list/delete enrollment tokens                 |        |    yes   |  yes  |
| create/list/revoke API keys                          |        |          |  yes  |
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleet.access.credentials import ApiKey
from fleet.store import Store

ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
API_KEY_PREFIX = "efk_"
TOKEN_PREFIX = "eft_"  # noqa: S105 - a prefix, not a secret
SECRET_BYTES = 32

bearer = HTTPBearer(auto_error=False, description="An API key (`efk_...`) or, for /v1/enroll, an "
                    "enrollment token (`eft_...`).")


def hash_secret(secret: str) -> str:
    """Hex sha256 of a high-entropy secret (see the module docstring for why not a slow KDF)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret(prefix: str) -> tuple[str, str, str]:
    """A fresh (public id, plaintext secret, hash) triple."""
    plaintext = prefix + secrets.token_urlsafe(SECRET_BYTES)
    return secrets.token_hex(6), plaintext, hash_secret(plaintext)


@dataclass(frozen=True)
class Principal:
    """Who is calling: `actor` is what the audit log records (`key:<id>:<name>`)."""

    key_id: str
    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}:{self.name}"

    def allows(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def create_api_key(store: Store, name: str, role: str, actor: str) -> tuple[ApiKey, str]:
    """Create a key; returns (public record, plaintext shown once). Raises FleetInputError."""
    key_id, plaintext, digest = new_secret(API_KEY_PREFIX)
    return store.access.insert_api_key(key_id, digest, name, role, actor), plaintext


def authenticate(store: Store, presented: str | None) -> Principal | None:
    """The principal for a presented API key, or None when missing, unknown or revoked."""
    if not presented or not presented.startswith(API_KEY_PREFIX) or len(presented) > 128:
        return None
    key = store.access.find_api_key(hash_secret(presented))
    if key is None:
        return None
    return Principal(key.id, key.name, key.role)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def require(role: str) -> Callable[..., Principal]:
    """FastAPI dependency: 401 without a valid API key, 403 when its role is below `role`.

    Raises `ValueError` for an unknown role (a programming error, at import time).
    """
    if role not in ROLE_RANK:
        raise ValueError(f"unknown role {role!r}")

    def dependency(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        store: Store = request.app.state.store
        if creds is None:
            raise _unauthorized("missing credentials: send 'Authorization: Bearer <API key>'")
        principal = authenticate(store, creds.credentials)
        if principal is None:
            raise _unauthorized("invalid or revoked API key")
        if not principal.allows(role):
            raise HTTPException(status_code=403, detail=f"role {principal.role!r} may not do this; "
                                f"it needs {role!r} or higher")
        request.state.principal = principal
        return principal

    return dependency


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
