"""Credentials the fleet issues: API keys (people, automation) and enrollment tokens (devices).

Only hashes are stored (see `fleet.access.auth` for why sha256 suffices); a plaintext exists
once, in the response that created it. Token consumption is one conditional UPDATE, so a
token races to exactly one device even with concurrent enrollments.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fleet.db.audit import AuditRepo
from fleet.db.database import FleetDatabase
from fleet.db.paging import Page
from fleet.db.rows import Record, dumps, iso
from fleet.devices.selector import validate_labels
from fleet.errors import AuthError, Conflict, FleetInputError, NotFound

ROLES = ("admin", "operator", "viewer")
KEY_PUBLIC = "id, name, role, created_at, created_by, revoked, revoked_at"
TOKEN_PUBLIC = "id, labels, created_by, created_at, expires_at, used_at, device_id"  # noqa: S105


@dataclass(frozen=True, slots=True)
class ApiKey(Record):
    """An `api_keys` row without its hash: the public record of a key."""

    FLAG_COLUMNS = ("revoked",)

    id: str
    name: str
    role: str
    created_at: str
    created_by: str
    revoked: bool
    revoked_at: str | None


@dataclass(frozen=True, slots=True)
class EnrollmentToken(Record):
    """An `enrollment_tokens` row without its hash; `labels` go to the device it enrolls."""

    JSON_COLUMNS = ("labels",)

    id: str
    labels: dict[str, str]
    created_by: str
    created_at: str
    expires_at: str
    used_at: str | None
    device_id: str | None


class AccessRepo:
    """API keys and enrollment tokens."""

    def __init__(self, database: FleetDatabase, audit: AuditRepo) -> None:
        self.database = database
        self.audit = audit

    # -- API keys -------------------------------------------------------------
    def insert_api_key(self, key_id: str, key_hash: str, name: str, role: str, actor: str) -> ApiKey:
        """Store a new key's hash. Raises FleetInputError for an unknown role or empty name."""
        if role not in ROLES:
            raise FleetInputError(f"role {role!r} must be one of {', '.join(ROLES)}")
        if not name.strip():
            raise FleetInputError("an API key needs a non-empty name")
        row = {"id": key_id, "key_hash": key_hash, "name": name, "role": role,
               "created_at": self.database.now(), "created_by": actor, "revoked": 0, "revoked_at": None}
        with self.database.tx() as db:
            db.insert("api_keys", row)
            out = ApiKey.from_row(row)
            self.audit.record(actor, "api_key.create", f"api-keys/{key_id}", None, out.to_dict())
        return out

    def find_api_key(self, key_hash: str) -> ApiKey | None:
        """The active key with this hash, or None (unknown or revoked)."""
        with self.database.read() as db:
            row = db.one(f"SELECT {KEY_PUBLIC} FROM api_keys WHERE key_hash = :h AND revoked = 0",  # noqa: S608
                         {"h": key_hash})
        return ApiKey.from_row(row) if row else None

    def get_api_key(self, key_id: str) -> ApiKey:
        with self.database.read() as db:
            row = db.one(f"SELECT {KEY_PUBLIC} FROM api_keys WHERE id = :id", {"id": key_id})  # noqa: S608
        if not row:
            raise NotFound(f"API key {key_id!r} not found")
        return ApiKey.from_row(row)

    def list_api_keys(self, cursor: str | None, limit: int) -> Page[ApiKey]:
        return self.database.page_of(f"SELECT {KEY_PUBLIC} FROM api_keys WHERE TRUE", {}, "id",  # noqa: S608
                                     cursor, limit, ApiKey.from_row)

    def count_active_admins(self) -> int:
        with self.database.read() as db:
            return int(db.scalar("SELECT count(*) FROM api_keys WHERE role = 'admin' AND revoked = 0"))

    def revoke_api_key(self, key_id: str, actor: str) -> ApiKey:
        """Raises NotFound, Conflict (already revoked, or the last active admin key)."""
        with self.database.tx() as db:
            before = self.get_api_key(key_id)
            if before.revoked:
                raise Conflict(f"API key {key_id!r} is already revoked")
            if before.role == "admin" and self.count_active_admins() <= 1:
                raise Conflict("refusing to revoke the last active admin key (create another admin first)")
            db.execute("UPDATE api_keys SET revoked = 1, revoked_at = :at WHERE id = :id",
                       {"at": self.database.now(), "id": key_id})
            after = self.get_api_key(key_id)
            self.audit.record(actor, "api_key.revoke", f"api-keys/{key_id}", before.to_dict(),
                              after.to_dict())
        return after

    # -- enrollment tokens ----------------------------------------------------
    def insert_token(self, token_id: str, token_hash: str, labels: dict[str, str], ttl_seconds: float,
                     actor: str) -> EnrollmentToken:
        """Store a one-time enrollment token's hash. Raises FleetInputError (labels, ttl)."""
        if ttl_seconds <= 0:
            raise FleetInputError("token TTL must be positive")
        now = self.database.clock()
        row = {"id": token_id, "token_hash": token_hash, "labels": dumps(validate_labels(labels)),
               "created_by": actor, "created_at": iso(now), "expires_at": iso(now + ttl_seconds),
               "used_at": None, "device_id": None}
        with self.database.tx() as db:
            db.insert("enrollment_tokens", row)
            out = EnrollmentToken.from_row(row)
            self.audit.record(actor, "enrollment_token.create", f"enrollment-tokens/{token_id}",
                              None, out.to_dict())
        return out

    def get_token(self, token_id: str) -> EnrollmentToken:
        with self.database.read() as db:
            row = db.one(f"SELECT {TOKEN_PUBLIC} FROM enrollment_tokens WHERE id = :id", {"id": token_id})  # noqa: S608
        if not row:
            raise NotFound(f"enrollment token {token_id!r} not found")
        return EnrollmentToken.from_row(row)

    def list_tokens(self, cursor: str | None, limit: int, unused_only: bool = False) -> Page[EnrollmentToken]:
        sql = f"SELECT {TOKEN_PUBLIC} FROM enrollment_tokens WHERE TRUE"  # noqa: S608
        if unused_only:
            sql += " AND used_at IS NULL"
        return self.database.page_of(sql, {}, "id", cursor, limit, EnrollmentToken.from_row)

    def delete_token(self, token_id: str, actor: str) -> None:
        """Withdraw an unused token. Raises NotFound, Conflict (already used)."""
        with self.database.tx() as db:
            before = self.get_token(token_id)
            if before.used_at is not None:
                raise Conflict(f"enrollment token {token_id!r} was already used by {before.device_id}")
            db.execute("DELETE FROM enrollment_tokens WHERE id = :id", {"id": token_id})
            self.audit.record(actor, "enrollment_token.delete", f"enrollment-tokens/{token_id}",
                              before.to_dict(), None)

    def consume_token(self, token_hash: str, device_id: str) -> EnrollmentToken:
        """Mark the token used by `device_id` and return it; call inside the enrollment transaction.

        Raises AuthError when the token is unknown, already used or expired (the message says which,
        but the API maps all three to the same 401 so a caller cannot probe tokens).
        """
        now = self.database.now()
        with self.database.tx() as db:
            row = db.one("SELECT * FROM enrollment_tokens WHERE token_hash = :h", {"h": token_hash})
            if not row:
                raise AuthError("unknown enrollment token")
            tok = EnrollmentToken.from_row(row)
            if tok.used_at is not None:
                raise AuthError(f"enrollment token {tok.id} was already used")
            if tok.expires_at <= now:
                raise AuthError(f"enrollment token {tok.id} expired at {tok.expires_at}")
            cur = db.execute(
                "UPDATE enrollment_tokens SET used_at = :now, device_id = :device WHERE id = :id "
                "AND used_at IS NULL",
                {"now": now, "device": device_id, "id": tok.id},
            )
            if cur.rowcount != 1:
                raise AuthError(f"enrollment token {tok.id} was already used")
            return replace(tok, used_at=now, device_id=device_id)
