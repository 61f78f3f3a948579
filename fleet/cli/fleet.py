"""`edgefleet fleet ...`: serve the fleet service, bootstrap keys and tokens, migrate the store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from pydantic import ValidationError
from rich.console import Console

from agent.contract.bundle import read_manifest
from agent.errors import EdgefleetError
from agent.logs import log_event
from fleet.access.auth import create_api_key
from fleet.cluster.roles import parse_roles
from fleet.db.files import secure_dir
from fleet.db.migrate import current
from fleet.devices.enrollment import create_enrollment_token
from fleet.devices.selector import validate_labels
from fleet.errors import FleetError, FleetInputError
from fleet.settings import FleetSettings
from fleet.store import Store

console = Console(stderr=True)
logger = logging.getLogger("edgefleet.fleet.cli")
data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                               help="State directory (fleet.db, keys/, repo/); env EDGEFLEET_DATA_DIR.")
database_option = click.option(
    "--database", "database_url", default=None, metavar="URL",
    help="postgresql://user@host:5432/db: every table in that PostgreSQL database instead of SQLite "
         "files in the data dir; env EDGEFLEET_DATABASE_URL (put a password there or in ~/.pgpass, "
         "not on the command line).")


def _settings(data_dir: Path | None, database_url: str | None = None, **overrides: Any) -> FleetSettings:
    """Settings from the environment and options; a bad value is a one-line error, not a traceback."""
    if database_url is not None:
        if urlsplit(database_url).password is not None:
            log_event(logger, "fleet.database_password_on_command_line", logging.WARNING,
                      hint="every local user can read it in /proc/<pid>/cmdline: pass it in "
                           "EDGEFLEET_DATABASE_URL or ~/.pgpass instead")
        overrides["database_url"] = database_url
    try:
        return FleetSettings.from_env(data_dir=data_dir, **overrides)
    except ValidationError as exc:  # the messages only: `input` could hold a password
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             for e in exc.errors())
        raise click.ClickException(f"invalid settings: {problems}") from None


def _store(settings: FleetSettings) -> Store:
    secure_dir(settings.data_dir)  # 0700 whatever the umask, as `serve` does
    try:
        return Store(settings.database, busy_timeout_ms=settings.limits.sqlite_busy_timeout_ms)
    except FleetError as exc:  # an unreachable PostgreSQL, a file that is not a database: one line
        raise click.ClickException(str(exc)) from exc


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` to a dict; raises click.BadParameter naming the bad pair."""
    labels: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--labels")
        labels[key.strip()] = value.strip()
    try:
        return validate_labels(labels)
    except FleetInputError as exc:
        raise click.BadParameter(str(exc), param_hint="--labels") from exc


@click.group(name="fleet")
def group() -> None:
    """Run the fleet service (admin API, publisher, rollout controller)."""


@group.command()
@data_dir_option
@database_option
@click.option("--host", default=None, help="Listen address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Listen port (default 8080).")
@click.option("--broker", "broker_url", default=None,
              help="The fleet's own MQTT broker URL (mqtt://user@host:port, password in "
                   "EDGEFLEET_BROKER_PASSWORD or --broker-password-file): starts the publisher.")
@click.option("--device-broker", "device_broker_url", default=None,
              help="Broker URL enrolling devices are told, without credentials (e.g. mqtts://broker:8883); "
                   "env EDGEFLEET_DEVICE_BROKER_URL; default: --broker without user and password.")
@click.option("--broker-password-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File whose first line is the fleet's broker password; "
                   "env EDGEFLEET_BROKER_PASSWORD_FILE.")
@click.option("--role", "role_names", multiple=True, default=("all",), show_default=True,
              help="What this process does: api, publisher, ingest, controller or all (repeat the option "
                   "or give a comma list). Several processes share the data directory; see docs/scaling.md.")
def serve(data_dir: Path | None, database_url: str | None, host: str | None, port: int | None,
          broker_url: str | None,
          device_broker_url: str | None, broker_password_file: Path | None,
          role_names: tuple[str, ...]) -> None:
    """Serve the admin API, the MQTT publisher (with --broker), the rollout controller and the
    timestamp refresher over DATA_DIR until interrupted (keys and repository made on first
    start); `--role` runs a part of them (several processes on one database, docs/scaling.md)."""
    from fleet.components import build_components  # lazy: uvicorn and the service: `serve` only
    from fleet.service import FleetService, bind_listener  # lazy: uvicorn: `serve` only

    if broker_url is not None and urlsplit(broker_url).password is not None:
        log_event(logger, "fleet.broker_password_on_command_line", logging.WARNING,
                  hint="every local user can read it in /proc/<pid>/cmdline: pass it in "
                       "EDGEFLEET_BROKER_PASSWORD or --broker-password-file instead")
    try:
        roles = parse_roles(role_names)
    except FleetInputError as exc:
        raise click.BadParameter(str(exc), param_hint="--role") from exc
    settings = _settings(data_dir, database_url, host=host, port=port, broker_url=broker_url,
                         device_broker_url=device_broker_url, broker_password_file=broker_password_file)
    try:
        # The port first: a busy one fails before keys, databases or components are touched.
        listener = bind_listener(settings.host, settings.port)
        FleetService(settings, listener=listener, component_factory=lambda store: build_components(
            settings, store, with_broker=broker_url is not None, roles=roles)).run()
    except EdgefleetError as exc:  # an unreachable broker, a busy port, unreadable keys: one line
        raise click.ClickException(str(exc)) from exc


@group.command("create-admin-key")
@data_dir_option
@database_option
@click.option("--name", default="bootstrap-admin", show_default=True, help="Name recorded with the key.")
def create_admin_key(data_dir: Path | None, database_url: str | None, name: str) -> None:
    """Create an admin API key and print it once (store it now: only its hash is kept)."""
    settings = _settings(data_dir, database_url)
    store = _store(settings)
    try:
        key, plaintext = create_api_key(store, name, "admin", "cli:create-admin-key")
    finally:
        store.close()
    console.print(f"created admin key {key.id} ({name}); it is shown only once:")
    click.echo(plaintext)


@group.command("create-token")
@data_dir_option
@database_option
@click.option("--labels", default="", help="Labels the enrolled device gets, e.g. env=prod,region=eu.")
@click.option("--ttl", "ttl_seconds", type=int, default=None, help="Seconds until the token expires.")
def create_token(data_dir: Path | None, database_url: str | None, labels: str,
                 ttl_seconds: int | None) -> None:
    """Create a one-time enrollment token and print it once."""
    settings = _settings(data_dir, database_url)
    ttl = ttl_seconds or settings.limits.token_ttl_seconds
    if not 0 < ttl <= settings.limits.max_token_ttl_seconds:
        raise click.BadParameter(f"must be 1..{settings.limits.max_token_ttl_seconds}", param_hint="--ttl")
    parsed = parse_labels(labels)
    store = _store(settings)
    try:
        token, plaintext = create_enrollment_token(store, parsed, ttl, "cli:create-token")
    finally:
        store.close()
    console.print(f"created enrollment token {token.id} (expires {token.expires_at}); shown only once:")
    click.echo(plaintext)


@group.command()
@data_dir_option
@database_option
def migrate(data_dir: Path | None, database_url: str | None) -> None:
    """Create or upgrade the fleet database schema (also done at every start)."""
    settings = _settings(data_dir, database_url)
    store = _store(settings)
    try:
        applied = store.applied_migrations
        with store.read() as db:
            version = current(db.conn, "store")
    finally:
        store.close()
    click.echo(f"schema at revision {version}; applied now: {', '.join(applied) or 'none'}")


@group.command("publish-bundle")
@data_dir_option
@database_option
@click.option("--model", "model", default=None, help="Registry model name (default: the bundle's own name).")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def publish_bundle_cmd(data_dir: Path | None, database_url: str | None, model: str | None,
                       bundle: Path) -> None:
    """Check BUNDLE, add it to the TUF repository and register it as a model version.

    Works on DATA_DIR directly (keys and repository are created if absent); the API route
    `POST /v1/models/{name}/versions/from-bundle|upload` does the same through the service.
    """
    from fleet.components import ensure_trust  # lazy: the service's modules: CLI start-up
    from fleet.registry.publish import publish_bundle  # lazy: CLI start-up

    settings = _settings(data_dir, database_url)
    try:
        name = model or read_manifest(bundle).name
    except EdgefleetError as exc:
        raise click.ClickException(f"{bundle} is not a bundle: {exc}") from exc
    store = _store(settings)
    try:
        with console.status(f"checking and publishing {bundle.name}"):
            _, repo = ensure_trust(settings)
            version = publish_bundle(store, repo, bundle, name, "cli:publish-bundle")
    except FleetError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()
    console.print(f"registered {version.id} -> target {version.bundle_target}")
    click.echo(version.id)


@group.command("export-offline")
@data_dir_option
@click.argument("model_version")
@click.option("--device", "devices", multiple=True, help="Device id to address (repeatable).")
@click.option("--selector", default=None, help="Address every device matching this label selector.")
@click.option("--cohort", default=None, help="Address one cohort document instead of devices.")
@click.option("--ttl-days", type=int, default=7, show_default=True, help="Director documents' lifetime.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The offline update file to write (e.g. on a USB stick), conventionally *.efo.")
def export_offline_cmd(data_dir: Path | None, model_version: str, devices: tuple[str, ...],
                       selector: str | None, cohort: str | None, ttl_days: int, output: Path) -> None:
    """Write one offline update file for MODEL:VERSION (TUF metadata, director documents, bundle).

    Reads DATA_DIR directly (the repository's files are replaced atomically and director
    sequences are SQLite transactions, so it is safe beside a running `fleet serve`); devices
    apply it with `edgefleet agent import FILE` or a watched drop directory.
    """
    from datetime import timedelta  # lazy: CLI start-up

    from fleet.components import ensure_trust  # lazy: the service's modules: CLI start-up
    from fleet.delivery.offline_export import export_offline  # lazy: CLI start-up
    from fleet.devices.selector import parse_selector  # lazy: CLI start-up
    from fleet.trust.director_signer import DirectorSigner  # lazy: CLI start-up

    name, sep, version = model_version.partition(":")
    if not sep or not name or not version:
        raise click.BadParameter("use MODEL:VERSION, e.g. mlp:2.0.0", param_hint="MODEL_VERSION")
    if not 1 <= ttl_days <= 365:
        raise click.BadParameter("must be 1..365", param_hint="--ttl-days")
    settings = _settings(data_dir)
    store = _store(settings)
    try:
        target_path = store.models.get_version(name, version).bundle_target
        if not target_path:
            raise FleetInputError(f"{model_version} has no bundle in the repository")
        chosen = list(devices)
        if selector:
            chosen += [d for d in store.devices.ids_matching(parse_selector(selector)) if d not in chosen]
        if not chosen and cohort is None:
            raise FleetInputError("no device matches: give --device, a --selector that matches, or --cohort")
        keystore, repo = ensure_trust(settings)
        signer = DirectorSigner(keystore, settings.data_dir / "director")
        try:
            result = export_offline(repo, signer, repo.target_ref(target_path), output, chosen, cohort,
                                    timedelta(days=ttl_days))
        finally:
            signer.close()
    except (FleetError, EdgefleetError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()
    console.print(f"wrote {result.path} for {len(result.addressees)} addressee(s); valid until "
                  f"{result.valid_until:%Y-%m-%d %H:%M} UTC (its TUF timestamp or director documents expire)")
