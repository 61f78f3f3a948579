"""Typed configuration of the fleet service, read from defaults, then environment, then CLI.

pydantic-settings is not a dependency, so `FleetSettings.from_env()` reads `EDGEFLEET_*`
variables itself; the CLI passes explicit overrides on top. Every limit is explicit here.

Two broker URLs, because they are for different parties: `broker_url` is the fleet's own
connection (user `fleet`, read/write on the whole topic tree, on the loopback listener), and
`device_broker_url` is what enrolling devices are told, without credentials (each device logs
in with the username and password its enrollment returns, on the device listener). The
fleet's password comes from `EDGEFLEET_BROKER_PASSWORD` or a file rather than the URL, so it
is not in `/proc/<pid>/cmdline` for every local user to read.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from agent.logs import log_event
from fleet.cluster.roles import ClusterSettings
from fleet.db.engine import redact
from fleet.db.files import is_private
from fleet.training.policy import TrainingSettings

ENV_PREFIX = "EDGEFLEET_"
MAX_PASSWORD_FILE_BYTES = 4096
logger = logging.getLogger("edgefleet.fleet.settings")


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


class TelemetrySettings(BaseModel):
    """Periodic drift evaluation and retraining triggers (`fleet/telemetry/monitor.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    evaluate_interval_s: float = Field(default=60.0, ge=0.05, le=24 * 3600)
    settle_s: float = Field(default=30.0, ge=0, le=3600,
                            description="Wait after a window ends before evaluating it (late reports)")
    lookback_s: float = Field(default=24 * 3600.0, ge=60, le=90 * 24 * 3600,
                              description="Only (model, version, cohort) with windows written this recently")
    persist_windows: int = Field(default=3, ge=1, le=10_000,
                                 description="Consecutive drifted windows before a retraining trigger")
    webhook_url: str | None = Field(default=None, pattern=r"^https?://", max_length=2000)
    command: tuple[str, ...] = Field(default=(), max_length=64,
                                     description="argv run with each alert's JSON on stdin")
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=120)
    command_timeout_s: float = Field(default=30.0, gt=0, le=600)
    max_drift_series: int = Field(default=5000, ge=1, le=1_000_000,
                                  description="Cap on per-feature drift gauge series at /metrics")
    clear_windows: int = Field(default=2, ge=1, le=1000,
                               description="Consecutive clean windows (or cycles) that end an alert episode")
    health_window_s: float = Field(default=900.0, ge=60, le=7 * 24 * 3600,
                                   description="Span of closed windows an error/latency regression compares")
    min_requests: int = Field(default=200, ge=1, le=10**9,
                              description="Requests each side needs before a regression is judged")
    max_error_increase: float = Field(default=0.02, ge=0, le=1,
                                      description="Failure-rate margin over the baseline version")
    max_latency_ratio: float = Field(default=1.5, gt=1, le=100,
                                     description="p95 latency ratio over the baseline version")
    offline_after_s: float = Field(default=900.0, ge=0, le=90 * 24 * 3600,
                                   description="Alert on devices offline longer than this (0: never)")
    gate_alerts: bool = Field(default=True, description="Alert when a gate pauses or aborts a rollout")
    max_serving_series: int = Field(default=500, ge=1, le=100_000,
                                    description="Cap on (model, version, cohort) serving series at /metrics")


class FleetSettings(BaseModel):
    """Where the service keeps its state and how it listens.

    `data_dir` holds everything: `fleet.db` (SQLite), `keys/` (signing keys), `repo/` (TUF
    repository) and `broker/passwd` (Mosquitto password file written at enrollment). With
    `database_url` (`postgresql://user:pass@host/db`, `--database`, `EDGEFLEET_DATABASE_URL`)
    every table (store, telemetry, alerts, director sequences) lives in that one PostgreSQL
    database instead of the SQLite files `fleet.db`, `telemetry.db`, `alerts.db` and
    `director/director.sqlite`; keys, the TUF repository and the broker file stay in `data_dir`.
    The URL is a secret (it may carry the password): it is never printed or logged whole.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    data_dir: Path = Path("./fleet-data")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    broker_url: str = "mqtt://127.0.0.1:1883"
    device_broker_url: str | None = Field(
        default=None, description="Broker URL enrolling devices are told (no credentials); default: "
        "broker_url without its user and password")
    broker_password: SecretStr | None = Field(
        default=None, description="The fleet's broker password (for broker_url's user)")
    broker_password_file: Path | None = Field(
        default=None, description="File whose first line is the fleet's broker password")
    topic_prefix: str = Field(default="edgefleet", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql:// URL of the fleet's database; default: SQLite files in data_dir")
    import_dir_override: Path | None = Field(default=None, alias="import_dir")
    limits: Limits = Field(default_factory=Limits)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)  # docs/training.md
    metrics_public: bool = Field(default=False, description="Serve /metrics without an API key")
    report_signatures: Literal["required", "optional"] = Field(
        default="required", description="Device reports must be signed by the device's key (docs/trust.md); "
        "optional: a migration aid that also accepts (and counts) unsigned reports of devices without a key")
    broker_reload_command: tuple[str, ...] | None = Field(
        default=None, min_length=1, max_length=64,
        description="argv run after every password-file rewrite, e.g. systemctl reload mosquitto")
    broker_pid_file: Path | None = Field(
        default=None, description="Send SIGHUP to the pid in this file after every password-file rewrite")
    broker_reload_timeout_s: float = Field(default=10.0, gt=0, le=120)
    device_cert_broker_url: str | None = Field(
        default=None, description="mqtts:// URL of the mutual-TLS listener told to devices that enroll "
        "with a certificate (`agent enroll --identity cert`); default: device_broker when it is mqtts://")
    device_broker_ca_file: Path | None = Field(
        default=None, description="PEM CA certificate(s) of the broker's server certificate, handed to "
        "enrolling devices (`broker.ca_pem`) so they can verify an mqtts:// broker without a --ca-file")
    device_cert_days: float = Field(default=90.0, gt=0, le=825,
                                    description="Validity of a device certificate issued at enrollment")
    device_crl_days: float = Field(default=30.0, ge=1, le=365,
                                   description="Next-update horizon of the device CRL (re-signed at half)")

    @field_validator("device_cert_broker_url")
    @classmethod
    def _cert_url_is_tls(cls, url: str | None) -> str | None:
        """A client certificate only means something over TLS, and the URL goes to every device."""
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme != "mqtts" or not parts.hostname or "@" in parts.netloc:
            raise ValueError(f"{url!r} must look like mqtts://host:port (TLS, no credentials)")
        return url

    delta_bases: int = Field(default=3, ge=0, le=16, description="Delta bundles per rollout from the N most "
                             "common versions its devices run (0: devices always fetch full bundles)")

    @field_validator("device_broker_url")
    @classmethod
    def _device_url_has_no_credentials(cls, url: str | None) -> str | None:
        """Refuse to start rather than hand every device a login (see the module docstring)."""
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"{url!r} must look like mqtt://host:port or mqtts://host:port")
        if "@" in parts.netloc:
            raise ValueError("must not carry credentials: every enrolled device would receive them "
                             "(devices log in with the username and password their enrollment returns)")
        return url

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, url: SecretStr | None) -> SecretStr | None:
        """Only PostgreSQL is a database URL (SQLite is the default, its files in data_dir)."""
        if url is None:
            return None
        scheme = urlsplit(url.get_secret_value()).scheme
        if scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError(f"must be a postgresql:// URL (got scheme {scheme!r}); unset means SQLite")
        return SecretStr(url.get_secret_value().replace("postgres://", "postgresql://", 1)
                         if scheme == "postgres" else url.get_secret_value())

    @model_validator(mode="after")
    def _one_password_source(self) -> FleetSettings:
        """The fleet's password from exactly one place; a file is read now, so a bad one stops the start."""
        given = {"the broker URL": urlsplit(self.broker_url).password is not None,
                 "broker_password": self.broker_password is not None,
                 "broker_password_file": self.broker_password_file is not None}
        sources = [name for name, present in given.items() if present]
        if len(sources) > 1:
            raise ValueError(f"the broker password is given twice ({' and '.join(sources)}): give it once")
        if (self.broker_password is not None or self.broker_password_file is not None) and \
                not urlsplit(self.broker_url).username:
            raise ValueError("a broker password needs a user in the broker URL, e.g. mqtt://fleet@127.0.0.1:1884")
        if self.broker_password_file is not None:
            self.broker_password = SecretStr(_read_password_file(self.broker_password_file))
        return self

    @property
    def device_broker(self) -> str:
        """What enrolling devices are told: `device_broker_url`, else `broker_url` without its userinfo."""
        if self.device_broker_url is not None:
            return self.device_broker_url
        parts = urlsplit(self.broker_url)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

    @property
    def device_cert_broker(self) -> str | None:
        """What devices enrolling with a certificate are told: `device_cert_broker_url`, else
        `device_broker` when it is TLS, else None (certificate enrollment is then refused)."""
        if self.device_cert_broker_url is not None:
            return self.device_cert_broker_url
        return self.device_broker if urlsplit(self.device_broker).scheme == "mqtts" else None

    @property
    def device_ca_dir(self) -> Path:
        """The device CA (`fleet/trust/device_ca.py`): key, certificate and CRL."""
        return self.data_dir / "device-ca"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fleet.db"

    @property
    def database(self) -> Path | str:
        """Where the fleet store lives: the PostgreSQL URL, else `data_dir/fleet.db`."""
        return self.database_url.get_secret_value() if self.database_url is not None else self.db_path

    @property
    def telemetry_database(self) -> Path | str:
        """The telemetry windows: the same PostgreSQL database, else `data_dir/telemetry.db`."""
        url = self.database_url
        return url.get_secret_value() if url is not None else self.telemetry_db_path

    @property
    def alerts_database(self) -> Path | str:
        """The drift alerts: the same PostgreSQL database, else `data_dir/alerts.db`."""
        return self.database_url.get_secret_value() if self.database_url is not None else self.alerts_db_path

    @property
    def director_database(self) -> Path | str | None:
        """The director's sequences: the PostgreSQL database, else None (its SQLite file in
        `data_dir/director`)."""
        return self.database_url.get_secret_value() if self.database_url is not None else None

    @property
    def database_shown(self) -> str:
        """The database for logs and messages: the URL without its password, or the file path."""
        return redact(self.database)

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

    @property
    def telemetry_db_path(self) -> Path:
        return self.data_dir / "telemetry.db"

    @property
    def alerts_db_path(self) -> Path:
        return self.data_dir / "alerts.db"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> FleetSettings:
        """Build settings from `EDGEFLEET_DATA_DIR`, `_DATABASE_URL`, `_HOST`, `_PORT`, `_BROKER_URL`,
        `_DEVICE_BROKER_URL`, `_BROKER_PASSWORD`, `_BROKER_PASSWORD_FILE`, `_TOPIC_PREFIX` and
        `EDGEFLEET_LIMIT_<NAME>` variables (`EDGEFLEET_TELEMETRY_<NAME>` for `TelemetrySettings`,
        `EDGEFLEET_CLUSTER_<NAME>` for `ClusterSettings`,
        `EDGEFLEET_METRICS_PUBLIC`, `EDGEFLEET_BROKER_RELOAD_COMMAND` (shell-quoted),
        `EDGEFLEET_BROKER_PID_FILE`, `EDGEFLEET_BROKER_RELOAD_TIMEOUT_S`, `EDGEFLEET_DEVICE_CERT_BROKER_URL`,
        `EDGEFLEET_DEVICE_CERT_DAYS`, `EDGEFLEET_DEVICE_CRL_DAYS`, `EDGEFLEET_DEVICE_BROKER_CA_FILE`,
        `EDGEFLEET_REPORT_SIGNATURES`,
        `EDGEFLEET_TRAINING_POLICIES`: a JSON file of `TrainingSettings`),
        then apply non-None `overrides`.

        Raises pydantic.ValidationError when a value is invalid (the message names the field).
        """
        env = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for field in ("data_dir", "host", "port", "broker_url", "device_broker_url", "topic_prefix",
                      "import_dir", "broker_password", "broker_password_file", "database_url",
                      "report_signatures"):
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
        telemetry: dict[str, Any] = {
            name: env[ENV_PREFIX + "TELEMETRY_" + name.upper()]
            for name in TelemetrySettings.model_fields
            if ENV_PREFIX + "TELEMETRY_" + name.upper() in env
        }
        if "command" in telemetry:  # one shell-quoted string in the environment
            telemetry["command"] = tuple(shlex.split(telemetry["command"]))
        if telemetry:
            values["telemetry"] = telemetry
        cluster = {name: env[ENV_PREFIX + "CLUSTER_" + name.upper()] for name in ClusterSettings.model_fields
                   if ENV_PREFIX + "CLUSTER_" + name.upper() in env}
        if cluster:
            values["cluster"] = cluster
        if ENV_PREFIX + "METRICS_PUBLIC" in env:
            values["metrics_public"] = env[ENV_PREFIX + "METRICS_PUBLIC"]
        for field in ("broker_pid_file", "broker_reload_timeout_s", "device_cert_broker_url",
                      "device_cert_days", "device_crl_days", "device_broker_ca_file"):
            if ENV_PREFIX + field.upper() in env:
                values[field] = env[ENV_PREFIX + field.upper()]
        if ENV_PREFIX + "BROKER_RELOAD_COMMAND" in env:  # one shell-quoted string, like the telemetry command
            argv = tuple(shlex.split(env[ENV_PREFIX + "BROKER_RELOAD_COMMAND"]))
            values["broker_reload_command"] = argv or None
        if ENV_PREFIX + "TRAINING_POLICIES" in env:  # a JSON file: {"tick_s": .., "policies": [..]}
            values["training"] = _read_json_file(Path(env[ENV_PREFIX + "TRAINING_POLICIES"]))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)


def _read_json_file(path: Path) -> Any:
    """A JSON document (the training policies). Raises ValueError naming the file."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot read training policies {path}: {exc}") from None


def _read_password_file(path: Path) -> str:
    """The first line of `path`; warns when group or others may read it (a secret the fleet only reads)."""
    try:
        raw = path.read_bytes()[:MAX_PASSWORD_FILE_BYTES]
        private = is_private(path)
    except OSError as exc:
        raise ValueError(f"cannot read broker password file {path}: {exc.strerror or exc}") from None
    if not private:
        log_event(logger, "fleet.broker_password_file.readable", logging.WARNING, path=str(path),
                  hint="chmod 600 it: group or others can read the fleet's broker password")
    password = raw.decode("utf-8", "replace").splitlines()[0] if raw.strip() else ""
    if not password:
        raise ValueError(f"broker password file {path} is empty")
    return password
