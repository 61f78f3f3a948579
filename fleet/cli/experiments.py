"""`edgefleet experiments ...`: A/B experiments through the fleet API.

Why `recommend` is its own command: the verdict is computed on request from the arms'
observations and merged telemetry (sequential tests, so it may be read at any time), while
`show` only reads the stored experiment.

Routes: list `GET /v1/experiments`, show `GET /v1/experiments/{id}`, create
`POST /v1/experiments` (starts assigning arms), recommend `GET .../recommendation`, stop
`POST .../stop`. The API has no pause, resume, promote or rollback for experiments: `stop` ends
one, and the winner goes out with `edgefleet rollouts create`.
"""

from __future__ import annotations

import click

from fleet.cli.api_output import CONTEXT, Column, Session, api_command, limit_option, parse_pairs, quote

EXPERIMENT_COLUMNS: list[Column] = [
    ("id", "id"), ("name", "name"), ("a", "version_a"), ("b", "version_b"), ("selector", "selector"),
    ("split b", "split_b"), ("state", "state"), ("devices", "devices"),
]


@click.group(name="experiments", context_settings=CONTEXT)
def group() -> None:
    """A/B experiments over the fleet API: list, show, create, recommend, stop."""


@group.command("list")
@limit_option
@api_command
def list_experiments(s: Session, limit: int | None) -> None:
    """List experiments with their arms and devices per arm."""
    s.show_list(s.client.pages("/v1/experiments", limit), EXPERIMENT_COLUMNS, "experiments")


@group.command("show")
@click.argument("experiment_id")
@api_command
def show(s: Session, experiment_id: str) -> None:
    """Show EXPERIMENT_ID: arms, cohort, metrics and their goals, devices per arm."""
    row = s.client.get(f"/v1/experiments/{quote(experiment_id)}")
    s.show_record(row, [*EXPERIMENT_COLUMNS, ("metrics", "metrics"), ("min samples", "min_samples"),
                        ("alpha", "alpha"), ("min devices", "min_devices"), ("taus", "taus"),
                        ("created", "created_at"), ("by", "created_by")])


@group.command("create")
@click.argument("name")
@click.option("--a", "version_a", required=True, metavar="MODEL:VERSION", help="Control arm.")
@click.option("--b", "version_b", required=True, metavar="MODEL:VERSION", help="Candidate arm.")
@click.option("--selector", default="", help="Label selector of the cohort ('' = every device).")
@click.option("--split-b", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Share of the cohort that runs B (server default 0.5).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME=min|max",
              help="A metric and its goal, e.g. latency_ms=min (repeatable; server defaults otherwise).")
@click.option("--min-samples", type=click.IntRange(1), default=None, help="Samples per arm before a verdict.")
@click.option("--alpha", type=float, default=None, help="Significance level (server default 0.05).")
@click.option("--min-devices", type=click.IntRange(2), default=None,
              help="Devices per arm before any verdict (server default).")
@click.option("--tau", "taus", multiple=True, metavar="METRIC=VALUE",
              help="Effect of interest for a metric, e.g. latency_ms=2.5 (repeatable; server defaults: "
                   "0.01 for error_rate, 10 %% of arm A's mean otherwise).")
@click.option("--idempotency-key", default=None, help="Retry-safe create: the same key replays the answer.")
@api_command
def create(s: Session, name: str, version_a: str, version_b: str, selector: str, split_b: float | None,
           metrics: tuple[str, ...], min_samples: int | None, alpha: float | None,
           min_devices: int | None, taus: tuple[str, ...], idempotency_key: str | None) -> None:
    """Create experiment NAME comparing --a and --b on the cohort and start assigning devices."""
    goals: dict[str, str] = {}
    for text in metrics:
        goals.update(parse_pairs(text, "--metric"))
    body: dict[str, object] = {"name": name, "version_a": version_a, "version_b": version_b,
                               "selector": selector}
    scales = _taus(taus)
    optional = {"split_b": split_b, "metrics": goals or None, "min_samples": min_samples, "alpha": alpha,
                "min_devices": min_devices, "taus": scales or None}
    body.update({k: v for k, v in optional.items() if v is not None})
    s.show_record(s.client.post("/v1/experiments", body, idempotency_key), EXPERIMENT_COLUMNS)


def _taus(texts: tuple[str, ...]) -> dict[str, float]:
    """`--tau METRIC=VALUE` options as a dict; raises click.BadParameter for a value that is no number."""
    scales: dict[str, float] = {}
    for text in texts:
        for metric, value in parse_pairs(text, "--tau").items():
            try:
                scales[metric] = float(value)
            except ValueError:
                raise click.BadParameter(f"{value!r} is not a number", param_hint="--tau") from None
    return scales


@group.command("recommend")
@click.argument("experiment_id")
@api_command
def recommend(s: Session, experiment_id: str) -> None:
    """Compare the arms of EXPERIMENT_ID: verdict, per-metric values, p-values, samples still needed."""
    row = s.client.get(f"/v1/experiments/{quote(experiment_id)}/recommendation")
    if s.as_json:
        s.json(row)
        return
    s.note(f"verdict: {row['verdict']}: {row['summary']}")
    s.show_list(row.get("metrics", []), [
        ("metric", "metric"), ("goal", "goal"), ("test", "test"), ("n a", "n_a"), ("n b", "n_b"),
        ("a", "value_a"), ("b", "value_b"), ("p-value", "p_value"), ("effect", "effect"),
        ("ci low", "ci_low"), ("ci high", "ci_high"), ("r", "effect_size"), ("devices a", "devices_a"),
        ("devices b", "devices_b"), ("devices needed", "devices_needed"), ("winner", "winner"),
        ("more samples", "more_samples_needed")], "metrics")


@group.command("stop")
@click.argument("experiment_id")
@api_command
def stop(s: Session, experiment_id: str) -> None:
    """Stop EXPERIMENT_ID: no more devices are assigned to its arms."""
    s.show_record(s.client.post(f"/v1/experiments/{quote(experiment_id)}/stop"), EXPERIMENT_COLUMNS)


if __name__ == "__main__":  # `python -m fleet.cli.experiments ...`, also without the installed entry point
    group(prog_name="edgefleet experiments")
