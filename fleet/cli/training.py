"""`edgefleet training ...`: training jobs through the fleet API.

Routes: start `POST /v1/training/jobs`, list `GET /v1/training/jobs`, show
`GET /v1/training/jobs/{id}`, logs `GET /v1/training/jobs/{id}/logs` (`--follow` polls until the
job ends), cancel/approve/reject `POST /v1/training/jobs/{id}/<action>`. Starting, cancelling
and deciding need the operator role and are audited; reading needs viewer.
"""

from __future__ import annotations

import time
from typing import Any

import click

from fleet.cli.api_output import CONTEXT, Column, Session, api_command, limit_option, quote

JOB_COLUMNS: list[Column] = [
    ("id", "id"), ("model", "model"), ("parent", "parent_version"), ("cohort", "cohort"), ("state", "state"),
    ("step", "step"), ("progress", lambda r: f"{100 * float(r.get('progress') or 0):.0f}%"),
    ("version", "result_version"), ("rollout", "rollout_id"), ("trigger", "trigger_alert_id"),
]
DETAIL: list[Column] = [*JOB_COLUMNS, ("datasets", lambda r: ", ".join(r.get("dataset_ids") or [])),
                        ("attempts", "attempts"), ("approval", "approval"), ("error", "error"),
                        ("metrics", lambda r: _metrics(r.get("metrics") or {})),
                        ("created by", "created_by")]


def _metrics(m: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, int | float))


FINISHED = {"succeeded", "rejected", "failed", "cancelled"}


@click.group(name="training", context_settings=CONTEXT)
def group() -> None:
    """Training jobs over the fleet API: start, list, show, logs, cancel, approve, reject."""


@group.command("start")
@click.argument("model")
@click.option("--parent", "parent_version", required=True, help="The version the new one replaces.")
@click.option("--cohort", default="", help="The drifted cohort (its collected data; the canary's {cohort}).")
@click.option("--dataset", "dataset_ids", multiple=True, help="Train on this dataset version (repeatable; "
              "default: the policy's collected data).")
@api_command
def start(s: Session, model: str, parent_version: str, cohort: str, dataset_ids: tuple[str, ...]) -> None:
    """Start a training job for MODEL (it needs a training policy in the fleet's settings)."""
    row = s.client.post("/v1/training/jobs", {"model": model, "parent_version": parent_version,
                                              "cohort": cohort, "dataset_ids": list(dataset_ids)})
    s.show_record(row, DETAIL)


@group.command("list")
@click.option("--state", default=None, help="Only jobs in this state (queued, training, failed, ...).")
@click.option("--model", default=None, help="Only jobs of this model.")
@limit_option
@api_command
def list_jobs(s: Session, state: str | None, model: str | None, limit: int | None) -> None:
    """List training jobs."""
    s.show_list(s.client.pages("/v1/training/jobs", limit, state=state, model=model), JOB_COLUMNS,
                "training jobs")


@group.command("show")
@click.argument("job_id")
@api_command
def show(s: Session, job_id: str) -> None:
    """Show JOB_ID: state, progress, datasets, metrics, the version and rollout it made."""
    s.show_record(s.client.get(f"/v1/training/jobs/{quote(job_id)}"), DETAIL)


@group.command("logs")
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="Seconds between polls with --follow.")
@api_command
def logs(s: Session, job_id: str, follow: bool, interval: float) -> None:
    """Print JOB_ID's log lines (the trainer's output, the job's steps)."""
    after, seen = -1, []
    while True:
        lines: list[dict[str, Any]] = s.client.get(f"/v1/training/jobs/{quote(job_id)}/logs", after=after)
        for ln in lines:
            after = int(ln["seq"])
            if s.as_json:
                seen.append(ln)
            else:
                click.echo(ln["line"])
        if not follow:
            break
        if not lines and s.client.get(f"/v1/training/jobs/{quote(job_id)}")["state"] in FINISHED:
            break
        if not lines:
            time.sleep(interval)
    if s.as_json:
        s.json(seen)


def _decide(action: str, doc: str) -> None:
    @click.argument("job_id")
    @click.option("--note", default="", help="Why (kept in the audit log).")
    @api_command
    def command(s: Session, job_id: str, note: str) -> None:
        body = {} if action == "cancel" else {"note": note}
        s.show_record(s.client.post(f"/v1/training/jobs/{quote(job_id)}/{action}", body), DETAIL)

    command.__doc__ = doc
    group.command(action)(command)


_decide("cancel", "Cancel JOB_ID (a running trainer is stopped; nothing is registered).")
_decide("approve", "Approve the canary of JOB_ID (awaiting approval): the worker starts it.")
_decide("reject", "Reject the canary of JOB_ID; its version stays registered, no rollout starts.")


if __name__ == "__main__":  # `python -m fleet.cli.training ...`, also without the installed entry point
    group(prog_name="edgefleet training")
