"""`edgefleet agent report-key`: this device's report signing key, for a device enrolled before keys.

`edgefleet agent enroll` makes the key; a device enrolled earlier has none, and its reports are
unsigned (a fleet with `report_signatures: required` refuses them). This command makes the key
in the agent's state directory if it is missing (0600; the private key never leaves the device)
and prints the public half, which an operator registers with
`edgefleet devices set-report-key <device> <key>` (`PUT /v1/devices/{id}/report-key`, audited).
Restart the agent afterwards so it signs with the key.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import click

from agent.config import load_config
from agent.daemon.report_signer import ensure_key, key_path
from agent.errors import EdgefleetError


@click.command("report-key")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("/etc/edgefleet/agent.json"), show_default=True, help="The agent's config.")
@click.option("--json", "as_json", is_flag=True, help="Print device id, key file and public key as JSON.")
def report_key_command(config_path: Path, as_json: bool) -> None:
    """Print this device's public report key (making the key pair first if there is none)."""
    try:
        config = load_config(config_path)
        public, made = ensure_key(config.state_dir)
    except (EdgefleetError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    encoded = base64.b64encode(public).decode()
    path = key_path(config.state_dir)
    if as_json:
        click.echo(json.dumps({"device_id": config.device_id, "key_file": str(path), "public_key": encoded,
                               "made": made}, indent=2))
        return
    click.echo(f"{'made' if made else 'found'} {path} (0600): the private key stays on this device")
    click.echo(f"register it at the fleet: edgefleet devices set-report-key {config.device_id} {encoded}")
    click.echo(encoded)
