"""`edgefleet collections ...`: opt-in data collection over the fleet API.

Routes: `POST /v1/collections` (create: operator), `GET /v1/collections[/{id}]`, `DELETE
/v1/collections/{id}` (stop: the policy is withdrawn from the devices' signed documents).
The samples it brings back: `edgefleet datasets` (`fleet/cli/datasets.py`). See
docs/telemetry.md, *Data collection*.
"""

from __future__ import annotations

import click

from fleet.cli.api_output import CONTEXT, Column, Session, api_command, quote

COLLECTION_COLUMNS: list[Column] = [
    ("id", "collection_id"), ("model", "model"), ("version", "version"), ("selector", "selector"),
    ("status", "status"), ("applied", "applied"), ("devices", lambda c: len(c.get("devices") or [])),
    ("by", "created_by"),
]
COLLECTION_FIELDS: list[Column] = [
    *COLLECTION_COLUMNS, ("policy", "policy"), ("closes at", "closes_at"),
    ("datasets", lambda c: [d["dataset_id"] for d in c.get("datasets") or []]),
]


@click.group(name="collections", context_settings=CONTEXT)
def group() -> None:
    """Opt-in data collection: ask devices of a cohort for a bounded sample of their inputs."""


@group.command("create")
@click.option("--model", required=True, help="Model name the devices run.")
@click.option("--version", "version", required=True, help="Model version the devices run.")
@click.option("--selector", default="", help="Device label selector, e.g. 'site=lab,!legacy'.")
@click.option("--strategy", type=click.Choice(["reservoir", "low_confidence"]), default="reservoir",
              show_default=True, help="Uniform sample, or the rows with the lowest top-class confidence.")
@click.option("--max-rows", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--max-bytes", type=click.IntRange(1024, 64 * 1024 * 1024), default=4 * 1024 * 1024,
              show_default=True)
@click.option("--max-seconds", type=click.IntRange(1, 7 * 86400), default=3600, show_default=True,
              help="How long each device samples after it got the policy.")
@click.option("--only-while-drift", is_flag=True, help="Only while a drift episode of the version is open.")
@api_command
def create(s: Session, model: str, version: str, selector: str, strategy: str, max_rows: int, max_bytes: int,
           max_seconds: int, only_while_drift: bool) -> None:
    """Create a collection; the fleet signs its policy into the matching devices' documents."""
    row = s.client.post("/v1/collections", {
        "model": model, "version": version, "selector": selector, "strategy": strategy, "max_rows": max_rows,
        "max_bytes": max_bytes, "max_seconds": max_seconds, "only_while_drift": only_while_drift})
    s.show_record(row, COLLECTION_FIELDS)


@group.command("list")
@api_command
def list_collections(s: Session) -> None:
    """List collections and their status."""
    s.show_list(s.client.get("/v1/collections"), COLLECTION_COLUMNS, "collections")


@group.command("show")
@click.argument("collection_id")
@api_command
def show(s: Session, collection_id: str) -> None:
    """Show COLLECTION_ID, its policy, devices and dataset versions."""
    s.show_record(s.client.get(f"/v1/collections/{quote(collection_id)}"), COLLECTION_FIELDS)


@group.command("stop")
@click.argument("collection_id")
@api_command
def stop(s: Session, collection_id: str) -> None:
    """Stop COLLECTION_ID: its policy is withdrawn and later chunks are refused."""
    s.show_record(s.client.delete(f"/v1/collections/{quote(collection_id)}"), COLLECTION_FIELDS)
