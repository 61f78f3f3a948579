"""`edgefleet datasets ...`: dataset versions collected from devices, over the fleet API.

Routes: `GET /v1/datasets[?collection=]`, `GET /v1/datasets/{id}`, `GET /v1/datasets/{id}/export`
(the `.npz`: arrays `x`, `confidence`, `meta`). See docs/telemetry.md, *Data collection*.
"""

from __future__ import annotations

from pathlib import Path

import click

from fleet.cli.api_output import CONTEXT, Column, Session, api_command, quote

DATASET_COLUMNS: list[Column] = [
    ("id", "dataset_id"), ("collection", "policy_id"), ("device", "device_id"), ("rows", "rows"),
    ("labelled", "labelled"), ("columns", "columns"), ("bytes", "bytes"), ("sha256", "sha256"),
]
DATASET_FIELDS: list[Column] = [*DATASET_COLUMNS, ("provenance", "provenance"), ("created", "created_at")]


@click.group(name="datasets", context_settings=CONTEXT)
def group() -> None:
    """Dataset versions collected from devices: list, show, export as .npz."""


@group.command("list")
@click.option("--collection", default=None, help="Only the versions of this collection.")
@api_command
def list_datasets(s: Session, collection: str | None) -> None:
    """List dataset versions (digest, rows, device, collection)."""
    s.show_list(s.client.get("/v1/datasets", collection=collection), DATASET_COLUMNS, "datasets")


@group.command("show")
@click.argument("dataset_id")
@api_command
def show_dataset(s: Session, dataset_id: str) -> None:
    """Show DATASET_ID with its provenance."""
    s.show_record(s.client.get(f"/v1/datasets/{quote(dataset_id)}"), DATASET_FIELDS)


@group.command("export")
@click.argument("dataset_id")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default: DATASET_ID.npz).")
@api_command
def export(s: Session, dataset_id: str, output: Path | None) -> None:
    """Export DATASET_ID as .npz (arrays x, confidence, meta; load with allow_pickle=False)."""
    data = s.client.get_bytes(f"/v1/datasets/{quote(dataset_id)}/export")
    path = output or Path(f"{dataset_id}.npz")
    path.write_bytes(data)
    s.note(f"wrote {len(data)} bytes to {path}")
