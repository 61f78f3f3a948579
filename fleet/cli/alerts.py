"""`edgefleet alerts ...`: the fleet's alerts and retraining triggers through the fleet API.

Why acknowledging goes through the API: an ack is audited (who, when, note) in the fleet's
audit log, and an acked alert drops out of `alerts list --unacked`, the on-call view.

Routes: list `GET /v1/alerts` (`--kind retrain` lists the triggers of `GET /v1/triggers`),
ack `POST /v1/alerts/{id}/ack`. The API has no route that reads one alert, so there is no
`alerts show`: `alerts list --json` carries every field.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from fleet.cli.api_output import CONTEXT, Column, Session, api_command, limit_option


def _when(key: str) -> Any:
    def cell(row: dict[str, Any]) -> str | None:
        value = row.get(key)
        if value is None:
            return None
        return dt.datetime.fromtimestamp(float(value), dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return cell


ALERT_COLUMNS: list[Column] = [
    ("id", "id"), ("kind", "kind"), ("model", "model"), ("version", "version"), ("cohort", "cohort"),
    ("subject", "subject"), ("statistic", "statistic"), ("value", "value"), ("threshold", "threshold"),
    ("devices", "device_count"), ("episode", "episode"), ("esc", "escalation"),
    ("raised", _when("created_at")), ("acked by", "acked_by"),
]


@click.group(name="alerts", context_settings=CONTEXT)
def group() -> None:
    """Alerts and retraining triggers over the fleet API: list, ack."""


@group.command("list")
@click.option("--kind", default=None, help="Only this kind: drift, retrain (the retraining triggers), "
              "error_rate, latency, offline or rollout_gate.")
@click.option("--model", default=None, help="Only alerts of this model.")
@click.option("--version", default=None, help="Only alerts of this model version.")
@click.option("--cohort", default=None, help="Only alerts of this cohort.")
@click.option("--subject", default=None, help="Only this subject (a feature, output:<name>, dataset, ...).")
@click.option("--acked/--unacked", default=None, help="Only acknowledged (or only open) alerts.")
@limit_option
@api_command
def list_alerts(s: Session, kind: str | None, model: str | None, version: str | None, cohort: str | None,
                subject: str | None, acked: bool | None, limit: int | None) -> None:
    """List alerts, newest first."""
    items = s.client.pages("/v1/alerts", limit, kind=kind, model=model, version=version, cohort=cohort,
                           subject=subject, acked=None if acked is None else str(acked).lower())
    s.show_list(items, ALERT_COLUMNS, "alerts")


@group.command("ack")
@click.argument("alert_id", type=int)
@click.option("--note", default="", help="What was done about it (kept with the alert and in the audit log).")
@api_command
def ack(s: Session, alert_id: int, note: str) -> None:
    """Acknowledge ALERT_ID (an alert or a retraining trigger)."""
    row = s.client.post(f"/v1/alerts/{alert_id}/ack", {"note": note})
    s.show_record(row, [*ALERT_COLUMNS, ("acked at", _when("acked_at")), ("note", "ack_note")])


if __name__ == "__main__":  # `python -m fleet.cli.alerts ...`, also without the installed entry point
    group(prog_name="edgefleet alerts")
