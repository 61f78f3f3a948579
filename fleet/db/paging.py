"""Keyset pagination: one page of records and the opaque cursor that continues after it.

A cursor is the last key of a page, base64url-encoded JSON, so a listing stays stable while
rows are added (no offsets) and a client cannot mistake it for anything it should parse.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fleet.errors import FleetInputError

T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    """One page of a listing plus the opaque cursor of the next page (None at the end)."""

    items: list[T] = field(default_factory=list)
    next_cursor: str | None = None


def encode_cursor(last_key: str | int) -> str:
    return base64.urlsafe_b64encode(json.dumps([last_key]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str | int:
    """Raises FleetInputError when the cursor was not made by `encode_cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise FleetInputError(f"cursor {cursor!r} is not a cursor this service issued") from exc
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | int)):
        raise FleetInputError(f"cursor {cursor!r} is not a cursor this service issued")
    return value[0]
