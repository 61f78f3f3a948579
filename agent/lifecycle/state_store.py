"""The lifecycle's durable state record, written atomically before every action.

Why: the daemon can die at any instant (power cut, OOM kill, a native crash inside the
runtime, the systemd watchdog). Like Mender's `SaveState`/`LoadStateFromDb`, the machine
saves where it is *before* acting, so a restart resumes from a known state. The write is
temp file in the same directory -> write -> flush -> `os.fsync` -> `os.replace` -> fsync of
the directory (`agent.durable_io.write_durably`, the seam the power-cut test records); the
previous good record is kept as `state.json.prev` so a torn or corrupt `state.json` falls
back to the last good one instead of leaving the device without a model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.durable_io import makedirs_durably, write_durably
from agent.errors import ConfigError, MisuseError
from agent.logs import log_event

log = logging.getLogger(__name__)

STATE_SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 1 << 20  # a record is a few KB; anything larger is corruption


@dataclass(frozen=True)
class DesiredDelta:
    """A director document's optional delta: rebuilds the target from the bundle `base_bundle`."""

    path: str
    length: int
    sha256: str
    base_bundle: str
    base_sha256: str
    format: str

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DesiredDelta:
        return cls(str(doc["path"]), int(doc["length"]), str(doc["sha256"]), str(doc["base_bundle"]),
                   str(doc["base_sha256"]), str(doc["format"]))


@dataclass(frozen=True)
class DesiredTarget:
    """What the latest accepted director document asks this device to run.

    A plain, serialisable copy of the director document's fields the lifecycle needs, so
    the state record never depends on the trust module's classes.
    """

    sequence: int
    path: str
    length: int
    sha256: str
    name: str
    version: str
    shadow: DesiredTarget | None = None
    delta: DesiredDelta | None = None

    # The director document's maintenance windows (`UpdateWindows` as a dict; None: any time).
    windows: dict[str, Any] | None = None

    @property
    def bundle_id(self) -> str:
        """`name-version`, the same identity as `Manifest.bundle_id`."""
        return f"{self.name}-{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DesiredTarget:
        shadow = doc.get("shadow")
        delta = doc.get("delta")
        return cls(
            sequence=int(doc["sequence"]),
            path=str(doc["path"]),
            length=int(doc["length"]),
            sha256=str(doc["sha256"]),
            name=str(doc["name"]),
            version=str(doc["version"]),
            shadow=cls.from_dict(shadow) if shadow else None,
            delta=DesiredDelta.from_dict(delta) if delta else None,

            windows=dict(doc["windows"]) if doc.get("windows") else None,
        )

    @classmethod
    def from_director(cls, doc: Any) -> DesiredTarget:
        """Copy from a verified `agent.contract.director.DirectorDocument` (duck-typed)."""

        def ref(t: Any, seq: int) -> DesiredTarget:
            return cls(seq, t.path, int(t.length), t.sha256, t.name, t.version)

        base = ref(doc.target, int(doc.sequence))
        windows = getattr(doc, "windows", None)
        if windows is not None:
            base = cls(**{**base.__dict__, "windows": windows.model_dump(mode="json", exclude_none=True)})
        shadow = getattr(doc, "shadow", None)
        d = getattr(doc, "delta", None)
        delta = None if d is None else DesiredDelta(
            d.path, int(d.length), d.sha256, d.base_bundle, d.base_sha256, d.format)
        return cls(**{**base.__dict__, "shadow": None if shadow is None else ref(shadow, int(doc.sequence)),
                      "delta": delta})


@dataclass
class StateRecord:
    """Everything needed to resume: where the machine is and which bundle is where."""

    schema_version: int = STATE_SCHEMA_VERSION
    state: str = "idle"
    active: str | None = None
    previous: str | None = None
    staged: str | None = None
    candidate: str | None = None  # the bundle the current update is installing
    shadow: str | None = None  # bundle running in shadow mode (never served)
    desired: DesiredTarget | None = None
    director_sequence: int = 0
    attempts: dict[str, int] = field(default_factory=dict)  # "state:bundle" -> entries
    crash_recoveries: int = 0  # consecutive restarts outside a stable state
    download_failures: int = 0
    retry_at: float = 0.0
    quarantined: dict[str, int] = field(default_factory=dict)  # bundle -> director sequence
    download_path: str | None = None
    last_error: str | None = None
    last_measurements: dict[str, float] = field(default_factory=dict)
    hold: str | None = None  # why the update waits (`waiting_for_window`, `held: low_memory ...`)
    holds: int = 0  # resource holds in a row (their backoff)
    updated_at: float = 0.0

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["desired"] = self.desired.to_dict() if self.desired else None
        return json.dumps(doc, sort_keys=True, indent=1).encode()

    def fingerprint(self) -> bytes:
        """The record's content without its timestamp (to skip no-op saves)."""
        stamp, self.updated_at = self.updated_at, 0.0
        try:
            return self.to_json()
        finally:
            self.updated_at = stamp

    @classmethod
    def from_json(cls, data: bytes) -> StateRecord:
        """Parse a record. Raises `ConfigError` on an unknown schema, `ValueError` on garbage."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("state record is not a JSON object")
        version = doc.get("schema_version")
        if version != STATE_SCHEMA_VERSION:
            raise ConfigError(
                f"state record schema_version {version!r} is not supported "
                f"(this agent reads {STATE_SCHEMA_VERSION}); upgrade the agent or move the file away"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown fields in state record: {sorted(unknown)}")
        desired = doc.get("desired")
        doc["desired"] = DesiredTarget.from_dict(desired) if desired else None
        return cls(**doc)


class StateStore:
    """Atomic, fsynced persistence of one `StateRecord` with a last-good fallback."""

    def __init__(
        self,
        state_dir: Path,
        clock: Any = time.time,
        after_save: Callable[[StateRecord], None] | None = None,
    ) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "state.json"
        self.prev_path = self.dir / "state.json.prev"
        self._clock = clock
        self._last_good: bytes | None = None
        self._current_ok = False  # state.json holds a record this object wrote or parsed
        self._after_save = after_save  # e.g. the daemon publishes its reported state

    def save(self, record: StateRecord) -> None:
        """Write `record` atomically; the last good record stays as `state.json.prev`.

        A crash between the two renames leaves no `state.json`; `load()` then returns
        `state.json.prev`, the last good record, which is the right answer.

        Raises `MisuseError` if the state directory cannot be written.
        """
        record.updated_at = float(self._clock())
        data = record.to_json()
        try:
            makedirs_durably(self.dir)
            if self._current_ok and self.path.exists():
                # state.json is known good: it becomes the fallback by one rename (no copy, no
                # extra fsync; the directory fsync after the new write covers both renames).
                self.path.replace(self.prev_path)
            else:
                previous = self._last_good if self._last_good is not None else self._current_if_valid()
                if previous is not None:
                    write_durably(self.prev_path, previous)
            write_durably(self.path, data)
            self._last_good = data
            self._current_ok = True
        except OSError as exc:
            raise MisuseError(f"cannot write state record in {self.dir}: {exc}") from exc
        if self._after_save is not None:
            self._after_save(record)

    def _current_if_valid(self) -> bytes | None:
        """The bytes of `state.json` if they parse (never copy a torn file over `.prev`)."""
        try:
            data = self.path.read_bytes()
            StateRecord.from_json(data)
        except (OSError, ValueError, TypeError, KeyError, ConfigError):
            return None
        return data

    def load(self) -> StateRecord:
        """The last good record, or a fresh one if none was ever written.

        A corrupt or truncated `state.json` falls back to `state.json.prev` (logged).
        Raises `ConfigError` when a record has an unknown schema_version: silently
        starting fresh would forget which bundle is verified and active.
        """
        for candidate in (self.path, self.prev_path):
            if not candidate.exists():
                continue
            try:
                if candidate.stat().st_size > MAX_RECORD_BYTES:
                    raise ValueError("state record is larger than any real one")
                record = StateRecord.from_json(candidate.read_bytes())
            except ConfigError:
                raise
            except (ValueError, TypeError, KeyError, OSError) as exc:
                log_event(
                    log, "lifecycle.state_corrupt", logging.WARNING, file=str(candidate), error=str(exc)
                )
                continue
            self._current_ok = candidate is self.path
            if candidate is self.prev_path:
                log_event(log, "lifecycle.state_fallback", logging.WARNING, file=str(candidate))
            self._last_good = record.to_json()
            return record
        return StateRecord()
