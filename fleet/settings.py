"""Typed configuration of the fleet service, read from defaults, then environment, then CLI.

pydantic-settings is not a dependency, so `FleetSettings.from_env()` reads `EDGEFLEET_*`
variables itself; the CLI passes explicit overrides on top. Every limit is explicit here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "EDGEFLEET_"


class Limits(BaseModel):
    """Bounds the API enforces so that no request can make the service do unbounded work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_page_size: int = Field(default=50, ge=1, le=1000)
    max_page_size: int = Field(default=500, ge=1, le=10_000)
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, description="JSON request bodies")
    token_ttl_seconds: int = Field(default=24 * 3600, ge=60, le=30 * 24 * 3600)
    max_token_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    sqlite_busy_timeout_ms: int = Field(default=5000, ge=0, le=600_000)


class FleetSettings(BaseModel):
    """Where the service keeps its state and how it listens.

    `data_dir` holds everything: `fleet.db` (SQLite), `keys/` (signing keys), `repo/` (TUF
    repository) and `broker/passwd` (Mosquitto password file written at enrollment).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    data_dir: Path = Path("./fleet-data")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    broker_url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = Field(default="edgefleet", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    import_dir_override: Path | None = Field(default=None, alias="import_dir")
    limits: Limits = Field(default_factory=Limits)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fleet.db"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def repo_dir(self) -> Path:
        return self.data_dir / "repo"

    @property
    def import_dir(self) -> Path:
        """The only directory server-side imports (MLflow) may read from."""
        return self.import_dir_override or self.data_dir / "imports"

    @property
    def broker_passwd_path(self) -> Path:
        return self.data_dir / "broker" / "passwd"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> FleetSettings:
        """Build settings from `EDGEFLEET_DATA_DIR`, `_HOST`, `_PORT`, `_BROKER_URL`, `_TOPIC_PREFIX`
        and `EDGEFLEET_LIMIT_<NAME>` variables, then apply non-None `overrides`.

        Raises pydantic.ValidationError when a value is invalid (the message names the field).
        """
        env = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for field in ("data_dir", "host", "port", "broker_url", "topic_prefix", "import_dir"):
            raw = env.get(ENV_PREFIX + field.upper())
            if raw is not None:
                values[field] = raw
        limits = {
            name: env[ENV_PREFIX + "LIMIT_" + name.upper()]
            for name in Limits.model_fields
            if ENV_PREFIX + "LIMIT_" + name.upper() in env
        }
        if limits:
            values["limits"] = limits
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
