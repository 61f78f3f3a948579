"""`edgefleet sim load`: run load devices against a fleet's broker (docs/scaling.md).

With `--drill`, run the whole fault drill instead (`scale_run.run_scale`: several fleet
processes on a fresh data directory, a canary, the leader killed) and print its verdict.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import click

from fleet.errors import FleetMisuseError
from fleet.settings import FleetSettings
from fleet.store import Store
from simulators.broker import parse_broker_url
from simulators.load_devices.fleet_setup import device_ids, register_devices
from simulators.load_devices.loop import LoadFleet
from simulators.load_devices.scale_run import ScaleConfig, run_scale


@click.command(name="load")
@click.option("--broker", "broker_url", required=True, help="The devices' broker, mqtt://host:port.")
@click.option("--devices", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--id-prefix", default="load", show_default=True, help="Device ids are <prefix>-00000, ...")
@click.option("--active", default="loadmlp-1.0.0", show_default=True, help="Bundle the devices start on.")
@click.option("--install-s", type=click.FloatRange(0, 3600), default=0.5, show_default=True,
              help="Seconds from a director document to the commit.")
@click.option("--register", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Enroll the devices in this fleet data directory first (labels env=load).")
@click.option("--duration", type=click.FloatRange(0), default=0, help="Seconds to run; 0: until Ctrl-C.")
@click.option("--drill", is_flag=True, help="Run the multi-process fault drill against this broker instead.")
def load_command(broker_url: str, devices: int, id_prefix: str, active: str, install_s: float,
                 data_dir: Path | None, duration: float, drill: bool) -> None:
    """Connect DEVICES load devices (one selector loop) that follow director documents and report
    like agents, without running models; print their counters when stopped."""
    try:
        host, port = parse_broker_url(broker_url)
    except FleetMisuseError as exc:  # a bad URL is a usage error, one line
        raise click.BadParameter(str(exc), param_hint="--broker") from exc
    if drill:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_scale(ScaleConfig(devices=devices, install_s=install_s), Path(tmp), host, port)
        click.echo(json.dumps(asdict(result), indent=2))
        raise SystemExit(0 if result.passed else 1)
    ids = device_ids(devices, id_prefix)
    if data_dir is not None:
        store = Store(FleetSettings(data_dir=data_dir).db_path)
        try:
            click.echo(f"registered {register_devices(store, ids)} new load devices", err=True)
        finally:
            store.close()
    fleet = LoadFleet(host, port, "edgefleet", ids, active=active, install_s=install_s)
    fleet.start()
    started = time.monotonic()
    try:
        while duration == 0 or time.monotonic() - started < duration:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    click.echo(json.dumps(asdict(fleet.stats)))
