"""How every fleet SQLite file is opened, so the connection settings live in one place.

The fleet keeps four SQLite files: the fleet store (`fleet.db`), the telemetry windows, the
alerts and the director's sequence numbers. Each is one connection shared by its owner's
threads behind the owner's lock (hence `check_same_thread=False`), each runs in WAL mode so
readers never wait for the writer, and each waits `busy_timeout_ms` for another process's
write lock instead of failing at once. What differs is asked for by name: foreign keys and
`synchronous = FULL` (a committed change survives power loss, not only a process crash)
where the owner relies on them, and driver-level autocommit for an owner that issues its
own `BEGIN`/`COMMIT`. Schemas stay with their owners (`fleet.db.migrations` for the store).
Every file is made 0600 (its parents 0700 when created) before SQLite opens it, whatever the
umask (`fleet.db.files`), and `secure_delete` zeroes freed pages where the owner asks for it
(the store: a scrubbed secret must not linger in free space).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fleet.db.files import secure_file

DEFAULT_BUSY_TIMEOUT_MS = 10_000


def open_sqlite(
    path: Path | str,
    *,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    foreign_keys: bool = False,
    synchronous_full: bool = False,
    autocommit: bool = False,
    secure_delete: bool = False,
) -> sqlite3.Connection:
    """Connect to the SQLite file at `path` (created if missing) and switch it to WAL.

    Raises sqlite3.DatabaseError when the file exists but is not a SQLite database; the
    caller turns that into its own error, naming what the file was for. Raises
    FleetMisuseError when the file's mode cannot be set.
    """
    timeout_s = busy_timeout_ms / 1000
    path = secure_file(path)
    if autocommit:
        conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), timeout=timeout_s, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if foreign_keys:
            conn.execute("PRAGMA foreign_keys = ON")
        if secure_delete:
            conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        if synchronous_full:
            conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn
