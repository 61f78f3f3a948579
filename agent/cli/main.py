"""Root of the `edgefleet` command line.

Subcommand groups are discovered through the `edgefleet.commands` entry-point group so
that this module (installed with the agent) never imports `fleet` or `simulators`: a group
whose extra is not installed is listed with a hint instead of crashing the whole CLI.

The `agent` group ships in this package, so `edgefleet agent ...` (the device daemon included)
resolves it directly instead of scanning every installed distribution's entry points (a
start-up cost the daemon does not need); `--help` listings and the other groups still scan.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from agent.logs import configure_logging

_GROUP_HELP = {
    "agent": "Run the device agent, score files offline, inspect local state.",
    "keys": "Create and rotate the TUF and director signing keys.",
    "repo": "Manage the TUF repository: add bundles, refresh the timestamp.",
    "bundle": "Build and inspect signed model bundles.",
    "fleet": "Run the fleet service (admin API, publisher, rollout controller).",
    "sim": "Run the simulated device swarm and its scenarios.",
    "demo": "Run the end-to-end demo on this machine.",
    "models": "Model registry over the fleet API: list, show, create, publish bundles, move stages.",
    "devices": "Device inventory over the fleet API: list, show, relabel, revoke, enrollment tokens.",
    "rollouts": "Rollouts over the fleet API: list, show, create, pause, resume, abort, promote, rollback.",
    "experiments": "A/B experiments over the fleet API: list, show, create, recommend, stop.",
    "alerts": "Alerts and retraining triggers over the fleet API: list, ack.",
    "collections": "Opt-in data collection over the fleet API: create, list, show, stop.",
    "datasets": "Dataset versions collected from devices over the fleet API: list, show, export.",
    "training": "Training jobs over the fleet API: start, list, show, logs, cancel, approve, reject.",
}
_ORDER = ["keys", "bundle", "repo", "fleet", "models", "devices", "rollouts", "experiments", "alerts",
          "collections", "datasets", "training", "agent", "sim", "demo"]


class _PluginGroup(click.Group):
    """A click group whose subcommands are loaded lazily from entry points."""

    def _entry_points(self) -> dict[str, Any]:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group="edgefleet.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self._entry_points()) | set(self.commands)
        return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        try:
            if cmd_name == "agent":  # our own group (also the `agent` entry point): no scan needed
                from agent.cli.agent_commands import group  # lazy: only `edgefleet agent` loads its group

                return group
            ep = self._entry_points().get(cmd_name)
            if ep is None:
                return None
            command = ep.load()
        except ImportError as exc:
            return _missing_extra(cmd_name, exc)
        if not isinstance(command, click.Command):  # pragma: no cover - packaging error
            raise click.ClickException(f"entry point {cmd_name!r} is not a click command")
        return command


def _missing_extra(name: str, exc: ImportError) -> click.Command:
    extra = "agent" if name == "agent" else "fleet"

    @click.command(name=name, help=f"{_GROUP_HELP.get(name, '')} (unavailable: {exc.name} missing)")
    def _unavailable() -> None:
        raise click.ClickException(
            f"`edgefleet {name}` needs the '{extra}' extra: pip install 'edgefleet[{extra}]' ({exc})"
        )

    return _unavailable


@click.group(cls=_PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
@click.option("--log-json/--no-log-json", default=False, help="Emit logs as JSON lines.")
@click.version_option(package_name="edgefleet")
def cli(log_level: str, log_json: bool) -> None:
    """edgefleet: signed ML model bundles for fleets of edge devices."""
    configure_logging(level=log_level, json_lines=log_json)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="edgefleet", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - interactive
        logging.getLogger("edgefleet").info("interrupted")
        sys.exit(130)

