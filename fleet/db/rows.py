"""What goes into a row and what comes out: canonical JSON text, ISO timestamps, typed records.

Repositories return a `Record` per table (a frozen dataclass built by `Record.from_row`), so
callers read `device.labels` and mypy checks the name and the type; JSON text columns are
decoded into typed fields and SQLite's 0/1 flags into booleans in that one place. `Row` and
`decode_row` remain for the tables whose repositories still hand out dict rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, fields
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

Row = dict[str, Any]


def iso(ts: float) -> str:
    """Seconds since the epoch as a sortable ISO-8601 UTC string (microseconds)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces) for storage and hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def decode_row(row: Row | None, json_cols: tuple[str, ...]) -> Row | None:
    """A row with its JSON text columns parsed (None stays None)."""
    if row is None:
        return None
    out = dict(row)
    for col in json_cols:
        if out.get(col) is not None:
            out[col] = json.loads(out[col])
    return out


class Record:
    """Base of the typed records: subclasses are `@dataclass(frozen=True, slots=True)`.

    `from_row` takes the record's fields from a row by name (other columns, such as secret
    hashes, are left behind), parses the JSON text of `JSON_COLUMNS` and turns the 0/1 of
    `FLAG_COLUMNS` into booleans. `to_dict` is the plain form the audit log stores.
    """

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]  # set by @dataclass on each subclass
    JSON_COLUMNS: ClassVar[tuple[str, ...]] = ()
    FLAG_COLUMNS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        values = {f.name: row[f.name] for f in fields(cls)}
        for col in cls.JSON_COLUMNS:
            if values[col] is not None:
                values[col] = json.loads(values[col])
        for col in cls.FLAG_COLUMNS:
            values[col] = bool(values[col])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
