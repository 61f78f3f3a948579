"""`edgefleet keys ...` and `edgefleet repo ...`: signing keys, the TUF repository, director documents."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress

from agent.contract.bundle import read_manifest
from agent.errors import UntrustedDataError
from fleet.errors import FleetError
from fleet.trust.director_signer import DirectorSigner
from fleet.trust.keys import ROLES, KeyStore
from fleet.trust.repository import ExpiryPolicy, Repository, dump_status

_console = Console(stderr=True)
_KEYS_OPT = click.option(
    "--keys-dir",
    type=click.Path(path_type=Path),
    default=Path("fleet-keys"),
    show_default=True,
    envvar="EDGEFLEET_KEYS_DIR",
    help="Key directory.",
)
_REPO_OPT = click.option(
    "--repo-dir",
    type=click.Path(path_type=Path),
    default=Path("fleet-repo"),
    show_default=True,
    envvar="EDGEFLEET_REPO_DIR",
    help="TUF repository directory.",
)


def _fail(exc: FleetError) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group("keys")
def keys_group() -> None:
    """Create, list and rotate the TUF and director signing keys."""


@keys_group.command("init")
@_KEYS_OPT
@click.option("--root-threshold", default=2, show_default=True, help="Root signatures required.")
@click.option("--root-keys", default=3, show_default=True, help="Number of offline root keys.")
@click.option("--force", is_flag=True, help="Overwrite an existing key store.")
def keys_init(keys_dir: Path, root_threshold: int, root_keys: int, force: bool) -> None:
    """Generate Ed25519 keys for root, targets, snapshot, timestamp and director."""
    try:
        KeyStore(keys_dir).init(root_keys=root_keys, root_threshold=root_threshold, overwrite=force)
    except FleetError as exc:
        raise _fail(exc) from None
    click.echo(
        f"keys created in {keys_dir} (root {root_threshold} of {root_keys}); private keys are 0600 PEM"
    )


@keys_group.command("list")
@_KEYS_OPT
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_list(keys_dir: Path, as_json: bool) -> None:
    """List roles, thresholds, key ids and signer URI schemes (never private keys)."""
    try:
        roles = KeyStore(keys_dir).roles()
    except FleetError as exc:
        raise _fail(exc) from None
    out: dict[str, Any] = {
        role: {
            "threshold": rk.threshold,
            "keys": [
                {"keyid": k.keyid, "scheme": k.public.scheme, "uri_scheme": k.uri.split(":")[0]}
                for k in rk.keys
            ],
            "retired": [k.keyid for k in rk.retired],
        }
        for role, rk in roles.items()
    }
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for role, info in out.items():
        click.echo(f"{role}: threshold {info['threshold']}, {len(info['retired'])} retired")
        for k in info["keys"]:
            click.echo(f"  {k['keyid']}  {k['scheme']}  ({k['uri_scheme']})")


@keys_group.command("rotate")
@_KEYS_OPT
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--count", type=int, default=None, help="Number of new keys (default: same as now).")
@click.option("--threshold", type=int, default=None, help="New threshold (default: unchanged).")
@click.option(
    "--repo-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Also publish a new root signed by the old and new root keys.",
)
def keys_rotate(
    keys_dir: Path, role: str, count: int | None, threshold: int | None, repo_dir: Path | None
) -> None:
    """Replace a role's keys; with --repo-dir, publish the new root that devices follow."""
    store = KeyStore(keys_dir)
    try:
        new = store.rotate(role, count=count, threshold=threshold)
        click.echo(f"{role}: {len(new.keys)} new key(s), threshold {new.threshold}")
        if repo_dir is not None:
            version = Repository(repo_dir, store).rotate_root()
            click.echo(f"published root version {version}")
        else:
            click.echo("run `edgefleet repo rotate-root` to publish the new keys to devices")
    except FleetError as exc:
        raise _fail(exc) from None


@click.group("repo")
def repo_group() -> None:
    """Manage the TUF repository: add bundles, refresh the timestamp, issue director documents."""


@repo_group.command("init")
@_REPO_OPT
@_KEYS_OPT
@click.option("--root-threshold", default=2, show_default=True)
@click.option("--root-keys", default=3, show_default=True)
@click.option("--timestamp-days", default=1.0, show_default=True, help="Timestamp expiry.")
def repo_init(
    repo_dir: Path, keys_dir: Path, root_threshold: int, root_keys: int, timestamp_days: float
) -> None:
    """Create version 1 of root, targets, snapshot and timestamp (and keys if missing)."""
    expiry = ExpiryPolicy(timestamp=timedelta(days=timestamp_days))
    try:
        Repository(repo_dir, KeyStore(keys_dir), expiry).init(
            root_threshold=root_threshold, root_keys=root_keys
        )
    except FleetError as exc:
        raise _fail(exc) from None
    click.echo(
        f"repository initialised in {repo_dir}; bootstrap devices with {repo_dir}/metadata/1.root.json"
    )


def _bundle_labels(bundle: Path, required: bool) -> dict[str, Any] | None:
    """`{"name", "version", "runtime"}` from the bundle manifest, if it has one.

    The bundle is otherwise opaque here: with an explicit target path, a file that is not a
    bundle is published without labels; without one, its manifest is needed to name it.
    """
    try:
        manifest = read_manifest(bundle)
    except UntrustedDataError as exc:
        if required:
            raise click.UsageError(f"{bundle} has no readable manifest ({exc}); give --target-path") from None
        return None
    return {"name": manifest.name, "version": manifest.version, "runtime": manifest.runtime}


@repo_group.command("add-bundle")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_REPO_OPT
@_KEYS_OPT
@click.option(
    "--target-path", default=None, help="TUF target path (default models/<name>/<name>-<version>.efb)."
)
def repo_add_bundle(bundle: Path, repo_dir: Path, keys_dir: Path, target_path: str | None) -> None:
    """Publish a bundle as a TUF target (signs targets, snapshot, timestamp)."""
    labels = _bundle_labels(bundle, required=target_path is None)
    if target_path is None:
        if labels is None:
            raise click.UsageError("--target-path is required (no bundle manifest reader available)")
        target_path = f"models/{labels['name']}/{labels['name']}-{labels['version']}.efb"
    try:
        with Progress(console=_console, transient=True) as progress:
            progress.add_task(f"signing {target_path}", total=None)
            ref = Repository(repo_dir, KeyStore(keys_dir)).add_target(bundle, target_path, labels)
    except FleetError as exc:
        raise _fail(exc) from None
    click.echo(json.dumps(ref.model_dump(), indent=2))


@repo_group.command("refresh-timestamp")
@_REPO_OPT
@_KEYS_OPT
@click.option("--timestamp-days", default=1.0, show_default=True)
def repo_refresh_timestamp(repo_dir: Path, keys_dir: Path, timestamp_days: float) -> None:
    """Re-sign timestamp.json with a fresh expiry (run from a timer, well within its lifetime)."""
    try:
        repo = Repository(
            repo_dir, KeyStore(keys_dir), ExpiryPolicy(timestamp=timedelta(days=timestamp_days))
        )
        click.echo(f"timestamp version {repo.refresh_timestamp()}")
    except FleetError as exc:
        raise _fail(exc) from None


@repo_group.command("rotate-root")
@_REPO_OPT
@_KEYS_OPT
def repo_rotate_root(repo_dir: Path, keys_dir: Path) -> None:
    """Publish root N+1 with the key store's current keys, signed by old and new root keys."""
    try:
        click.echo(f"published root version {Repository(repo_dir, KeyStore(keys_dir)).rotate_root()}")
    except FleetError as exc:
        raise _fail(exc) from None


@repo_group.command("status")
@_REPO_OPT
@_KEYS_OPT
def repo_status(repo_dir: Path, keys_dir: Path) -> None:
    """Role versions, expiries and targets."""
    try:
        click.echo(dump_status(Repository(repo_dir, KeyStore(keys_dir)).status()))
    except FleetError as exc:
        raise _fail(exc) from None


@repo_group.command("director")
@_REPO_OPT
@_KEYS_OPT
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where sequences persist (default <repo-dir>/director).",
)
@click.option("--device", default=None, help="Device id addressed.")
@click.option("--cohort", default=None, help="Cohort addressed (instead of --device).")
@click.option("--target", "target_path", required=True, help="TUF target path to run.")
@click.option("--shadow", "shadow_path", default=None, help="TUF target path to run in shadow.")
@click.option("--ttl-hours", default=168.0, show_default=True)
@click.option("--reason", default="")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write here.")
def repo_director(
    repo_dir: Path,
    keys_dir: Path,
    state_dir: Path | None,
    device: str | None,
    cohort: str | None,
    target_path: str,
    shadow_path: str | None,
    ttl_hours: float,
    reason: str,
    out: Path | None,
) -> None:
    """Sign a director document telling a device or cohort which target to run."""
    store = KeyStore(keys_dir)
    try:
        repo = Repository(repo_dir, store)
        signer = DirectorSigner(store, state_dir or repo_dir / "director")
        data = signer.issue(
            repo.target_ref(target_path),
            device_id=device,
            cohort=cohort,
            shadow=repo.target_ref(shadow_path) if shadow_path else None,
            ttl=timedelta(hours=ttl_hours),
            reason=reason,
        )
    except FleetError as exc:
        raise _fail(exc) from None
    if out is None:
        click.echo(data.decode())
    else:
        out.write_bytes(data)
        click.echo(f"wrote {out}")
