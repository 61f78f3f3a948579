"""`edgefleet models ...`: the model registry through the running fleet API.

Why through the API rather than the data directory: `fleet serve` owns the TUF repository
(its timestamp refresher re-signs it), so a second process publishing into the same
directory could reuse a metadata version. `models publish` uploads the bundle to
`POST /v1/models/{name}/versions/upload` and lets the service add the target under its lock.

Routes: list `GET /v1/models`, show `GET /v1/models/{name}` (+ versions) or
`GET .../versions/{version}` (+ history), create `POST /v1/models`, versions
`GET .../versions`, stage `POST .../versions/{version}/stage`, publish `POST .../versions/upload`.

`import-mlflow` reads an MLflow model (a local directory, or `models:/name/version` through
MLflow's client) on the operator's machine, builds its bundle here, registers the version with
MLflow's lineage (`POST .../versions`, artifact digest = MLflow's ONNX file) and uploads the
bundle, which the service attaches to that version because the digests match.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import click

from agent.contract.bundle import read_manifest
from agent.errors import EdgefleetError
from fleet.cli.api_client import EXIT_CONFLICT, EXIT_NOT_FOUND, ApiError
from fleet.cli.api_output import CONTEXT, Column, Session, api_command, limit_option, quote
from fleet.cli.sealed import publish_sealed_command, rewrap_command
from fleet.errors import NotFound

STAGES = ("registered", "staging", "canary", "production", "archived")
PUBLISH_TIMEOUT_S = 600.0  # the service checks the whole bundle before answering
MODEL_COLUMNS: list[Column] = [("name", "name"), ("description", "description"),
                               ("created", "created_at"), ("by", "created_by")]
VERSION_COLUMNS: list[Column] = [("id", "id"), ("stage", "stage"), ("runtime", "runtime"),
                                 ("bundle target", "bundle_target"), ("created", "created_at"),
                                 ("by", "created_by")]


@click.group(name="models", context_settings=CONTEXT)
def group() -> None:
    """Model registry over the fleet API: list, show, create, publish bundles, move stages."""


@group.command("list")
@limit_option
@api_command
def list_models(s: Session, limit: int | None) -> None:
    """List the registered models."""
    s.show_list(s.client.pages("/v1/models", limit), MODEL_COLUMNS, "models")


@group.command("show")
@click.argument("name")
@click.argument("version", required=False)
@api_command
def show(s: Session, name: str, version: str | None) -> None:
    """Show model NAME with its versions, or VERSION of it with lineage and stage history."""
    base = f"/v1/models/{quote(name)}"
    if version is None:
        model = s.client.get(base)
        versions = list(s.client.pages(f"{base}/versions"))
        if s.as_json:
            s.json({**model, "versions": versions})
            return
        s.show_record(model, MODEL_COLUMNS)
        s.show_list(versions, VERSION_COLUMNS, "versions")
        return
    row = s.client.get(f"{base}/versions/{quote(version)}")
    history = s.client.get(f"{base}/versions/{quote(version)}/history")
    if s.as_json:
        s.json({**row, "history": history})
        return
    s.show_record(row, [*VERSION_COLUMNS, ("digest", "artifact_digest"), ("lineage", "lineage")])
    s.show_list(history, [("at", "at"), ("from", "from_stage"), ("to", "to_stage"), ("by", "actor"),
                          ("note", "note")], "stage changes")


@group.command("create")
@click.argument("name")
@click.option("--description", default="", help="Free text shown in listings.")
@click.option("--idempotency-key", default=None, help="Retry-safe create: the same key replays the answer.")
@api_command
def create(s: Session, name: str, description: str, idempotency_key: str | None) -> None:
    """Create model NAME (versions come from `models publish`)."""
    row = s.client.post("/v1/models", {"name": name, "description": description}, idempotency_key)
    s.show_record(row, MODEL_COLUMNS)


@group.command("versions")
@click.argument("name")
@click.option("--stage", type=click.Choice(STAGES), default=None, help="Only versions in this stage.")
@limit_option
@api_command
def versions(s: Session, name: str, stage: str | None, limit: int | None) -> None:
    """List the versions of model NAME, oldest first."""
    s.show_list(s.client.pages(f"/v1/models/{quote(name)}/versions", limit, stage=stage),
                VERSION_COLUMNS, "versions")


@group.command("stage")
@click.argument("name")
@click.argument("version")
@click.argument("stage", type=click.Choice(STAGES))
@click.option("--note", default="", help="Why (kept in the stage history and the audit log).")
@api_command
def stage(s: Session, name: str, version: str, stage: str, note: str) -> None:
    """Move VERSION of NAME to STAGE (any order, except out of `archived`)."""
    row = s.client.post(f"/v1/models/{quote(name)}/versions/{quote(version)}/stage",
                        {"stage": stage, "note": note})
    s.show_record(row, VERSION_COLUMNS)


@group.command("publish")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model", default=None, help="Registry model name (default: the bundle's own name).")
@api_command
def publish(s: Session, bundle: Path, model: str | None) -> None:
    """Upload BUNDLE (.efb) to the fleet: it is checked, added to the TUF repository as a target
    and registered as a version (the model is created if absent)."""
    try:
        name = model or read_manifest(bundle).name
    except EdgefleetError as exc:
        raise click.ClickException(f"{bundle} is not a bundle: {exc}") from None
    _show_published(s, _upload(s, bundle, name))


def _upload(s: Session, bundle: Path, name: str) -> dict[str, Any]:
    with bundle.open("rb") as fh:
        row: dict[str, Any] = s.client.request(
            "POST", f"/v1/models/{quote(name)}/versions/upload", content=fh,
            headers={"Content-Type": "application/octet-stream"},
            timeout=max(PUBLISH_TIMEOUT_S, s.client.target.timeout_s))
    return row


def _show_published(s: Session, row: dict[str, Any]) -> None:
    if s.as_json:
        s.json(row)
        return
    s.note(f"registered {row['id']} -> target {row['bundle_target']}")
    click.echo(row["id"])


_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


def _api_lineage(lineage: dict[str, Any]) -> dict[str, Any]:
    """MLflow lineage in the API's shape: a dataset digest that is not sha256 moves to `source`."""
    out = {k: v for k, v in lineage.items() if k in ("training_code_ref", "dataset_ref", "hyperparameters",
                                                      "metrics", "source")}
    digest = lineage.get("dataset_digest")
    if digest is not None and _SHA256.match(str(digest)):
        out["dataset_digest"] = digest
    elif digest is not None:
        out["source"] = {**out.get("source", {}), "dataset_digest": str(digest)}
    return out


def _register_for_attach(s: Session, name: str, version: str, digest: str, lineage: dict[str, Any]) -> None:
    """Create the model if absent and register the version, or accept one waiting for this artifact."""
    base = f"/v1/models/{quote(name)}"
    try:
        s.client.get(base)
    except ApiError as exc:
        if exc.status != 404:
            raise
        run = lineage.get("source", {}).get("run_id", "?")
        s.client.post("/v1/models", {"name": name, "description": f"imported from MLflow run {run}"})
    body = {"version": version, "artifact_digest": digest, "runtime": "onnx",
            "lineage": _api_lineage(lineage)}
    try:
        s.client.post(f"{base}/versions", body)
    except ApiError as exc:
        if exc.status != 409:
            raise
        row = s.client.get(f"{base}/versions/{quote(version)}")
        if row["bundle_target"] is not None or row["artifact_digest"] != digest:
            raise ApiError(f"version {row['id']} exists with artifact {row['artifact_digest']} and bundle "
                           f"{row['bundle_target'] or '-'}: it cannot take this MLflow model ({digest})",
                           EXIT_CONFLICT, 409) from None
        s.note(f"{row['id']} is registered without a bundle: attaching this one")


@group.command("import-mlflow")
@click.argument("source")
@click.option("--model", "model", required=True, help="Registry model name.")
@click.option("--version", "version", required=True, help="Registry version (MAJOR.MINOR.PATCH).")
@click.option("--reference-data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Reference rows (.npy, rows x features): drift profile and golden inputs of the bundle.")
@click.option("--no-profile", is_flag=True,
              help="Build without --reference-data: drift monitoring is OFF for this version.")
@click.option("--run-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The mlruns run directory (params/, metrics/, tags/); default: found from SOURCE.")
@click.option("--metadata", "metadata_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="BundleMetadata JSON (health, tolerances, feature_names; name, version and lineage "
              "come from the options and MLflow).")
@api_command
def import_mlflow(s: Session, source: str, model: str, version: str, reference_data: Path | None,
                  no_profile: bool, run_dir: Path | None, metadata_path: Path | None) -> None:
    """Import SOURCE (an MLflow model directory, or models:/NAME/VERSION with the `mlflow` extra)
    as a deployable version: bundle built here, version registered with MLflow's run lineage."""
    if no_profile == (reference_data is not None):
        raise click.UsageError("give --reference-data (drift profile, golden inputs) or --no-profile")
    from fleet.registry.builder import BundleMetadata  # lazy: onnx, pydantic: for this command only
    from fleet.registry.mlflow_import import (  # lazy: the builder, as above
        build_mlflow_bundle,
        load_mlflow_model,
        load_reference,
    )
    from fleet.registry.mlflow_runs import download_models_uri  # lazy: yaml, MLflow: this command only

    base = None
    if metadata_path is not None:
        try:
            doc = json.loads(metadata_path.read_text(encoding="utf-8"))
            base = BundleMetadata.model_validate({**doc, "name": model, "version": version})
        except (OSError, ValueError, TypeError) as exc:  # unreadable, not JSON, not valid metadata
            raise click.ClickException(f"invalid --metadata {metadata_path}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="edgefleet-mlflow-") as tmp:
        try:
            run = None
            if source.startswith("models:/"):
                local, run = download_models_uri(source, Path(tmp) / "download")
            else:
                local = Path(source)
                if not local.is_dir():
                    raise click.ClickException(f"{source} is neither an MLflow model directory nor "
                                               "a models:/ reference")
            mm = load_mlflow_model(local, run=run, run_dir=run_dir)
            reference = None if reference_data is None else load_reference(reference_data)
            bundle = build_mlflow_bundle(mm, model, version, Path(tmp) / f"{model}-{version}.efb",
                                         reference=reference, no_profile=no_profile, base=base)
        except EdgefleetError as exc:
            raise ApiError(str(exc), EXIT_NOT_FOUND if isinstance(exc, NotFound) else 1) from None
        s.note(f"built {bundle.name} from {source} (model {mm.digest})")
        _register_for_attach(s, model, version, mm.digest, mm.lineage)
        _show_published(s, _upload(s, bundle, model))
        if no_profile:
            click.secho(f"WARNING: {model} {version} has no reference profile (--no-profile): drift "
                        "monitoring is OFF for it", err=True, fg="red", bold=True)


if __name__ == "__main__":  # `python -m fleet.cli.models ...`, also without the installed entry point
    group(prog_name="edgefleet models")


group.add_command(publish_sealed_command)  # bundle encryption (fleet.cli.sealed)
group.add_command(rewrap_command)
