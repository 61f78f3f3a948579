"""`edgefleet rollouts ...`: create rollouts and steer them through the fleet API.

Why every verb answers at once: the API records the operator's intent (pause, resume, abort)
or queues a command (promote, rollback, cancel); the rollout controller inside `fleet serve`
acts on its next tick. So a command prints the rollout as recorded, and `rollouts show`
tells what the controller has done since (`state`, `stage`, device counts).

Routes: list `GET /v1/rollouts`, show `GET /v1/rollouts/{id}` + `.../status`, create
`POST /v1/rollouts`, devices `GET .../devices`, pause|resume|abort `POST .../{verb}` (intent),
promote|rollback|cancel|approve `POST .../{verb}` (queued commands). There is no ack for rollouts.
"""

from __future__ import annotations

import click

from fleet.cli.api_output import (
    CONTEXT,
    Column,
    Session,
    api_command,
    json_argument,
    limit_option,
    parse_pairs,
    quote,
)

STATES = ("pending", "running", "paused", "rolling_back", "completed", "aborted", "rolled_back", "failed",
          "cancelled", "awaiting_approval")
ROLLOUT_COLUMNS: list[Column] = [
    ("id", "id"), ("version", "model_version_id"), ("selector", "selector"), ("state", "state"),
    ("desired", "desired"), ("stage", "stage"), ("updated", "updated_at"),
]
_VERBS = {
    "pause": "Ask the controller to pause ROLLOUT_ID (no new devices are assigned).",
    "resume": "Ask the controller to resume the paused ROLLOUT_ID.",
    "abort": "Ask the controller to abort ROLLOUT_ID (final: it cannot be resumed).",
    "promote": "Advance ROLLOUT_ID to its next stage now (skips the bake time and a gate pause).",
    "rollback": "Send every device ROLLOUT_ID assigned back to the bundle it ran before.",
    "cancel": "Stop ROLLOUT_ID at once from any unfinished state, leaving devices as they are.",
    "approve": "Approve the stage ROLLOUT_ID awaits (operator role; audited). Paused by an approval "
               "timeout? Approve, then resume.",
}


@click.group(name="rollouts", context_settings=CONTEXT)
def group() -> None:
    """Rollouts over the fleet API: list, show, create, pause, resume, abort, promote, rollback, approve."""


@group.command("list")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only rollouts in this state.")
@limit_option
@api_command
def list_rollouts(s: Session, state: str | None, limit: int | None) -> None:
    """List rollouts, newest last."""
    s.show_list(s.client.pages("/v1/rollouts", limit, state=state), ROLLOUT_COLUMNS, "rollouts")


@group.command("show")
@click.argument("rollout_id")
@api_command
def show(s: Session, rollout_id: str) -> None:
    """Show ROLLOUT_ID: plan, state, device counts per status, and its history."""
    base = f"/v1/rollouts/{quote(rollout_id)}"
    row = s.client.get(base)
    status = s.client.get(f"{base}/status")
    combined = {**row, "devices_total": status["devices_total"],
                "devices_by_status": status["devices_by_status"], "warnings": status.get("warnings", []),
                "baking_until": status.get("baking_until"), "approval_due": status.get("approval_due")}
    if s.as_json:
        s.json(combined)
        return
    for warning in combined["warnings"]:
        s.note(f"warning: {warning}")
    if combined["baking_until"]:
        s.note(f"stage {combined.get('stage')} baking until {combined['baking_until']}")
    if combined["state"] == "awaiting_approval":
        due = f" (the timeout acts at {combined['approval_due']})" if combined["approval_due"] else ""
        s.note(f"stage {combined.get('stage')} awaits approval{due}: "
               f"edgefleet rollouts approve {combined['id']}")
    s.show_record(combined, [*ROLLOUT_COLUMNS, ("strategy", "strategy"), ("thresholds", "thresholds"),
                             ("devices", "devices_total"), ("by status", "devices_by_status"),
                             ("warnings", "warnings"), ("baking until", "baking_until"),
                             ("approval due", "approval_due"),
                             ("created", "created_at"), ("by", "created_by")])
    s.show_list(row.get("history", []), [("at", "at"), ("event", "event"), ("by", "actor"),
                                         ("note", "note")], "history")


@group.command("create")
@click.argument("model_version_id", metavar="MODEL:VERSION")
@click.option("--selector", required=True, help="Label selector of the cohort, e.g. 'env=prod,site=plant-3'.")
@click.option("--kind", type=click.Choice(["all_at_once", "canary", "exponential"]), default=None,
              help="Strategy kind (shorthand for --strategy '{\"kind\": ...}').")
@click.option("--strategy", default=None, metavar="JSON|@FILE",
              help="Strategy document, e.g. '{\"kind\": \"canary\", \"stages\": [10, 100], \"bake_s\": 60}'.")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
              help="A gate threshold, e.g. max_install_failure_pct=10 (repeatable).")
@click.option("--allow-model-change", is_flag=True,
              help="Also move devices that serve another model or input/output schema (refused otherwise).")
@click.option("--idempotency-key", default=None, help="Retry-safe create: the same key replays the answer.")
@api_command
def create(s: Session, model_version_id: str, selector: str, kind: str | None, strategy: str | None,
           thresholds: tuple[str, ...], allow_model_change: bool, idempotency_key: str | None) -> None:
    """Create a rollout of MODEL:VERSION to the devices SELECTOR matches (the controller starts it)."""
    plan = json_argument(strategy, "--strategy")
    if kind is not None:
        plan["kind"] = kind
    gates: dict[str, float] = {}
    for text in thresholds:
        for name, value in parse_pairs(text, "--threshold").items():
            try:
                gates[name] = float(value)
            except ValueError:
                raise click.BadParameter(f"{name}={value!r} is not a number",
                                         param_hint="--threshold") from None
    body = {"model_version_id": model_version_id, "selector": selector, "strategy": plan, "thresholds": gates,
            "allow_model_change": allow_model_change}
    row = s.client.post("/v1/rollouts", body, idempotency_key)
    if not s.as_json:
        for warning in row.get("warnings", []):
            s.note(f"warning: {warning} (selector {row['selector']!r})")
    s.show_record(row, ROLLOUT_COLUMNS)


@group.command("devices")
@click.argument("rollout_id")
@click.option("--status", default=None, help="Only devices with this status (e.g. succeeded, failed).")
@limit_option
@api_command
def devices(s: Session, rollout_id: str, status: str | None, limit: int | None) -> None:
    """List the per-device progress of ROLLOUT_ID (written by the controller)."""
    s.show_list(s.client.pages(f"/v1/rollouts/{quote(rollout_id)}/devices", limit, status=status),
                [("device", "device_id"), ("stage", "stage"), ("status", "status"),
                 ("updated", "updated_at")], "devices in this rollout")


def _verb(verb: str) -> None:
    @click.argument("rollout_id")
    @click.option("--note", default="", help="Why (kept in the rollout's history and the audit log).")
    @api_command
    def command(s: Session, rollout_id: str, note: str) -> None:
        row = s.client.post(f"/v1/rollouts/{quote(rollout_id)}/{verb}", {"note": note})
        if s.as_json:
            s.json(row)
            return
        s.note(f"{verb}: recorded for rollout {row['id']}; the controller acts on its next tick")
        s.show_record(row, ROLLOUT_COLUMNS)

    command.__doc__ = _VERBS[verb]
    group.command(verb)(command)


for _name in _VERBS:
    _verb(_name)


if __name__ == "__main__":  # `python -m fleet.cli.rollouts ...`, also without the installed entry point
    group(prog_name="edgefleet rollouts")
