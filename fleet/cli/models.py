"""`edgefleet models ...`: the model registry through the running fleet API.

Why through the API rather than the data directory: `fleet serve` owns the TUF repository
(its timestamp refresher re-signs it), so a second process publishing into the same
directory could reuse a metadata version. `models publish` uploads the bundle to
`POST /v1/models/{name}/versions/upload` and lets the service add the target under its lock.

Routes: list `GET /v1/models`, show `GET /v1/models/{name}` (+ versions) or
`GET .../versions/{version}` (+ history), create `POST /v1/models`, versions
`GET .../versions`, stage `POST .../versions/{version}/stage`, publish `POST .../versions/upload`.
"""

from __future__ import annotations

from pathlib import Path

import click

from agent.contract.bundle import read_manifest
from agent.errors import EdgefleetError
from fleet.cli.api_output import CONTEXT, Column, Session, api_command, limit_option, quote

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
    with bundle.open("rb") as fh:
        row = s.client.request("POST", f"/v1/models/{quote(name)}/versions/upload", content=fh,
                               headers={"Content-Type": "application/octet-stream"},
                               timeout=max(PUBLISH_TIMEOUT_S, s.client.target.timeout_s))
    if s.as_json:
        s.json(row)
        return
    s.note(f"registered {row['id']} -> target {row['bundle_target']}")
    click.echo(row["id"])


if __name__ == "__main__":  # `python -m fleet.cli.models ...`, also without the installed entry point
    group(prog_name="edgefleet models")
