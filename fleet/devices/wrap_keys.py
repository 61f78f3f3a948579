"""The devices' X25519 wrap keys (bundle encryption): stored at enrollment, read to wrap for a cohort.

Only public keys are here; the private halves never leave the devices. A revoked device keeps
its row (the audit trail) but `for_devices` leaves it out, so a re-wrap after a revocation no
longer includes it (see docs/trust.md, "Bundle encryption").

Errors: `check_public_key` raises FleetInputError (not a base64 raw X25519 public key).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.contract.envelope import key_id, parse_public_key, public_key_raw
from agent.errors import MisuseError
from fleet.db.database import FleetDatabase
from fleet.errors import FleetInputError


@dataclass(frozen=True)
class WrapKey:
    device_id: str
    public_key: str  # base64 of the raw 32 bytes
    key_id: str


def check_public_key(text: object) -> str:
    """The key's `key_id` if `text` is a base64 raw X25519 public key."""
    if not isinstance(text, str):
        raise FleetInputError("wrap_public_key must be a string (base64 of a raw X25519 public key)")
    try:
        return key_id(public_key_raw(parse_public_key(text)))
    except MisuseError as exc:
        raise FleetInputError(f"wrap_public_key: {exc}") from None


def store_wrap_key(database: FleetDatabase, device_id: str, public_key: str) -> WrapKey:
    """Record (or replace) `device_id`'s wrap key. Raises FleetInputError."""
    kid = check_public_key(public_key)
    with database.tx() as db:
        db.upsert("device_wrap_keys", {"device_id": device_id, "public_key": public_key, "key_id": kid,
                                       "created_at": database.now()}, key=["device_id"])
    return WrapKey(device_id, public_key, kid)


def for_devices(database: FleetDatabase, device_ids: list[str]) -> list[WrapKey]:
    """The wrap keys of those of `device_ids` that have one and are not revoked, by device id."""
    wanted = set(device_ids)
    with database.read() as db:
        rows = db.query("SELECT k.device_id, k.public_key, k.key_id FROM device_wrap_keys k "
                        "JOIN devices d ON d.id = k.device_id WHERE d.revoked = 0 ORDER BY k.device_id")
    return [WrapKey(r["device_id"], r["public_key"], r["key_id"]) for r in rows if r["device_id"] in wanted]
