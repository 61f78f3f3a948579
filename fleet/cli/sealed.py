"""`edgefleet models publish-sealed` and `edgefleet models rewrap`: bundle encryption over the fleet API.

`publish-sealed PATH --selector S` registers a version from a plain bundle in the fleet's import
directory, published encrypted for the devices S matches (`POST .../versions/from-bundle/sealed`);
`rewrap NAME VERSION --selector S` wraps its content key again for the devices S matches now
(`POST .../versions/{version}/recipients`): run it after enrolling devices into the cohort or
revoking one. Both need the operator role. See docs/trust.md, "Bundle encryption".
"""

from __future__ import annotations

from typing import Any

import click

from fleet.cli.api_output import Session, api_command, quote

_SELECTOR_HELP = "Device label selector of the cohort, e.g. 'site=lab,tier in (edge)'."


def _show_wrap(s: Session, wrap: dict[str, Any]) -> None:
    s.note(f"wrapped for {len(wrap['devices'])} device(s) matching {wrap['selector']!r} -> "
           f"{wrap['recipients_target']}")
    if wrap["without_key"]:
        s.note(f"left out (enrolled without a wrap key): {', '.join(wrap['without_key'])}")


@click.command("publish-sealed")
@click.argument("path")
@click.option("--model", "model", required=True, help="Registry model name (the bundle's own name).")
@click.option("--selector", required=True, help=_SELECTOR_HELP)
@api_command
def publish_sealed_command(s: Session, path: str, model: str, selector: str) -> None:
    """Register PATH (a plain bundle inside the fleet's import directory) as a version of MODEL,
    published only encrypted, its content key wrapped for the devices SELECTOR matches."""
    out: dict[str, Any] = s.client.post(f"/v1/models/{quote(model)}/versions/from-bundle/sealed",
                                        {"path": path, "selector": selector})
    if s.as_json:
        s.json(out)
        return
    s.note(f"registered {out['version']['id']} -> sealed target {out['version']['bundle_target']}")
    _show_wrap(s, out["wrap"])
    click.echo(out["version"]["id"])


@click.command("rewrap")
@click.argument("name")
@click.argument("version")
@click.option("--selector", required=True, help=_SELECTOR_HELP)
@api_command
def rewrap_command(s: Session, name: str, version: str, selector: str) -> None:
    """Wrap the content key of sealed VERSION of NAME for the devices SELECTOR matches now (the
    sealed bundle is unchanged; revoked devices are left out)."""
    out: dict[str, Any] = s.client.post(f"/v1/models/{quote(name)}/versions/{quote(version)}/recipients",
                                        {"selector": selector})
    if s.as_json:
        s.json(out)
        return
    _show_wrap(s, out)
    click.echo(out["recipients_target"])
