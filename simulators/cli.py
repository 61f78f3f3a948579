"""`edgefleet sim` (run / list scenarios against a swarm) and `edgefleet demo` (the end-to-end demo).

Both build the same environment: a broker (the one given, or a private Mosquitto on a free
port, else the embedded iotcore broker: `simulators.broker.start_broker`), a temporary data
directory (fleet SQLite, keys, repository, device state), then run the chosen scenarios and
write the terminal summary, the HTML report and the JSON verdicts. The exit code is 0 only
when every scenario passed.

While they run, the logs go to a file named on start (`demo.log` beside the demo's report,
`sim.log` beside `sim run`'s reports or in `--keep`, else in the current directory; `--log-file`
chooses) and the terminal shows a live view of the scenario, its stage and the devices done, or
a few plain lines when it is not a terminal (`simulators.progress`).

Errors: usage problems (unknown scenario, bad broker URL, no broker available) are reported as
`click.ClickException`s; a failing scenario is a verdict, not an error.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from fleet.errors import FleetError, FleetMisuseError
from simulators.broker import AnyBroker, BrokerSettings, EmbeddedBroker, parse_broker_url, start_broker
from simulators.load_devices.cli import load_command
from simulators.progress import log_to_file, make_view
from simulators.report import print_summary, write_html, write_json
from simulators.scenarios import NOT_AVAILABLE, ScenarioContext, Verdict, get_scenarios, run_scenario

DEFAULT_DEVICES = 24
DEMO_SCENARIOS_MAX = 3
WEDGED_NOTE = (
    "the embedded broker no longer answers new connections: a client reset before its CONNACK "
    "and reconnected with the same id (rumqtt#1062); use Mosquitto, see docs/simulator.md"
)


@contextlib.contextmanager
def _broker(
    url: str | None, workdir: Path, devices: int, prefer_embedded: bool | None
) -> Iterator[tuple[str, int, AnyBroker | None]]:
    if url:
        host, port = parse_broker_url(url)
        yield host, port, None
        return
    # Room for every device plus the fleet's clients and the readiness probes.
    settings = BrokerSettings(max_connections=max(1024, 2 * devices + 64))
    broker = start_broker(workdir / "broker", settings, prefer_embedded=prefer_embedded)
    try:
        yield broker.host, broker.port, broker
    finally:
        broker.stop()


def run_suite(
    *,
    names: Sequence[str] | None,
    max_number: int | None,
    devices: int,
    processes: int,
    broker_url: str | None,
    json_path: Path | None,
    html_path: Path | None,
    keep_dir: Path | None = None,
    console: Console | None = None,
    prefer_embedded: bool | None = None,
    log_path: Path | None = None,
) -> list[Verdict]:
    """Build the environment, run the scenarios, write the reports; returns the verdicts.

    `prefer_embedded` None follows `EDGEFLEET_EMBEDDED_BROKER` (see `simulators.broker`).
    With `log_path` the logs go there while the scenarios run, and the console shows progress.
    Raises FleetError subclasses for usage problems (see the module docstring).
    """
    if broker_url and prefer_embedded:
        raise FleetMisuseError("--broker and --embedded-broker exclude each other")
    console = console or Console()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM must unwind like Ctrl-C so the broker and the swarm's workers are stopped.
        signal.signal(signal.SIGTERM, lambda _s, _f: sys.exit(143))
    scenarios = get_scenarios(list(names) if names else None, max_number)
    started = time.monotonic()
    verdicts: list[Verdict] = []
    with contextlib.ExitStack() as stack:
        if log_path is not None:
            stack.enter_context(log_to_file(log_path))
            console.print(f"logs: {log_path}", soft_wrap=True)
        view = make_view(console, len(scenarios))
        stack.callback(view.close)
        if keep_dir is not None:
            keep_dir.mkdir(parents=True, exist_ok=True)
            workdir = keep_dir
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefleet-sim-")))
        host, port, managed = stack.enter_context(_broker(broker_url, workdir, devices, prefer_embedded))
        view.note(f"broker: mqtt://{host}:{port}" + (f" (private {managed.kind})" if managed else ""))
        for index, scenario in enumerate(scenarios, 1):
            ctx = ScenarioContext(
                broker_host=host,
                broker_port=port,
                data_dir=workdir / scenario.name,
                devices=devices,
                processes=processes,
                options={"managed_broker": managed},
                progress=view.stage,
            )
            ctx.data_dir.mkdir(parents=True, exist_ok=True)
            view.scenario(index, len(scenarios), scenario.name, devices)
            verdict = run_scenario(scenario, ctx)
            if not verdict.passed and isinstance(managed, EmbeddedBroker) and not managed.accepting():
                verdict.details += f" [{WEDGED_NOTE}]"
            verdicts.append(verdict)
            mark = "[green]PASS[/green]" if verdict.passed else "[red]FAIL[/red]"
            view.result(verdict, f"{mark} {scenario.name} in {verdict.elapsed_s:.1f}s: {verdict.details}")
    elapsed = time.monotonic() - started
    print_summary(verdicts, console)
    notes = [f"{name}: not run ({why})" for name, why in NOT_AVAILABLE.items()]
    extra = {"not_available": dict(NOT_AVAILABLE), "devices": devices}
    if json_path is not None:
        write_json(json_path, verdicts, elapsed, extra)
        console.print(f"JSON verdicts: {json_path}")
    if html_path is not None:
        write_html(html_path, verdicts, elapsed, notes)
        console.print(f"HTML report: {html_path}")
    return verdicts


def write_openapi(path: Path) -> None:
    """Write the fleet API's OpenAPI document, built from the same app the scenarios serve."""
    from fleet.api import create_app  # lazy: FastAPI and the fleet: `sim --help` starts without
    from fleet.settings import FleetSettings  # lazy: pydantic-settings: CLI start-up

    with tempfile.TemporaryDirectory(prefix="edgefleet-openapi-") as tmp:
        app = create_app(FleetSettings(data_dir=Path(tmp)))
        try:
            path.write_text(json.dumps(app.openapi(), indent=2) + "\n")
        finally:
            app.state.store.close()


F = TypeVar("F", bound=Callable[..., Any])


def _log_option(default_help: str) -> Callable[[F], F]:
    return click.option(
        "--log-file", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help=f"Where the run's logs go (the terminal shows progress); default: {default_help}.",
    )


def _broker_options(command: F) -> F:
    """`--broker` and `--embedded-broker`, shared by `sim run` and `demo`."""
    command = click.option(
        "--embedded-broker",
        "prefer_embedded",
        is_flag=True,
        default=None,
        help="Start the embedded iotcore broker instead of Mosquitto (also EDGEFLEET_EMBEDDED_BROKER=1).",
    )(command)
    return click.option(
        "--broker", "broker_url", default=None, help="mqtt://host:port; default: Mosquitto, else iotcore."
    )(command)


@click.group(name="sim")
def sim_group() -> None:
    """Run the simulated device swarm and its scenarios (see docs/simulator.md)."""


sim_group.add_command(load_command)  # `edgefleet sim load`: load devices (simulators/load_devices)


@sim_group.command(name="list")
def sim_list() -> None:
    """List the registered scenarios (and the planned ones whose components are missing)."""
    for s in get_scenarios():
        click.echo(f"{s.number}  {s.name:<22} {s.description}")
    for name, why in NOT_AVAILABLE.items():
        click.echo(f"-  {name:<22} not available: {why}")


@sim_group.command(name="run")
@click.option("--devices", type=click.IntRange(1, 100_000), default=DEFAULT_DEVICES, show_default=True)
@click.option(
    "--processes",
    type=click.IntRange(0, 256),
    default=0,
    show_default=True,
    help="Worker processes for the swarm (one selector loop each); 0: one per core, "
    "and one per 200 devices for large swarms.",
)
@_broker_options
@click.option("--scenario", "names", multiple=True, help="Scenario name (repeatable); default: all.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--keep",
    "keep_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the working directory (broker, fleet, devices) here instead of a temp dir.",
)
@_log_option("sim.log in --keep, else beside --html/--json, else in the current directory")
def sim_run(
    devices: int,
    processes: int,
    broker_url: str | None,
    names: tuple[str, ...],
    json_path: Path | None,
    html_path: Path | None,
    keep_dir: Path | None,
    prefer_embedded: bool | None,
    log_file: Path | None,
) -> None:
    """Run scenarios against a swarm of simulated devices; exit 1 if any fails."""
    report = keep_dir or next((p.parent for p in (html_path, json_path) if p is not None), Path.cwd())
    try:
        verdicts = run_suite(
            names=names,
            max_number=None,
            devices=devices,
            processes=processes,
            broker_url=broker_url,
            json_path=json_path,
            html_path=html_path,
            keep_dir=keep_dir,
            prefer_embedded=prefer_embedded,
            log_path=log_file or report / "sim.log",
        )
    except FleetError as exc:
        raise click.ClickException(str(exc)) from None
    if not verdicts or not all(v.passed for v in verdicts):
        raise SystemExit(1)


@click.command(name="demo")
@_broker_options
@click.option("--devices", type=click.IntRange(1, 100_000), default=DEFAULT_DEVICES, show_default=True)
@click.option("--all", "run_all", is_flag=True, help="Run all scenarios, not only the first three.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the HTML report (default: ./edgefleet-demo-report.html).",
)
@click.option("--serve", is_flag=True, help="Afterwards keep a fleet and the swarm running and print the "
              "dashboard URL and a login key (until Ctrl-C).")
@_log_option("demo.log beside the HTML report")
def demo_command(
    broker_url: str | None,
    prefer_embedded: bool | None,
    devices: int,
    run_all: bool,
    json_path: Path | None,
    html_path: Path | None,
    serve: bool,
    log_file: Path | None,
) -> None:
    """The end-to-end demo: broker, fleet, a swarm of devices, scenarios 1-3 (all with --all)."""
    html_path = html_path or Path.cwd() / "edgefleet-demo-report.html"
    try:
        verdicts = run_suite(
            names=None,
            max_number=None if run_all else DEMO_SCENARIOS_MAX,
            devices=devices,
            processes=0,
            broker_url=broker_url,
            json_path=json_path,
            html_path=html_path,
            prefer_embedded=prefer_embedded,
            log_path=log_file or html_path.parent / "demo.log",
        )
    except FleetError as exc:
        raise click.ClickException(str(exc)) from None
    openapi_path = html_path.with_name(html_path.stem + "-openapi.json")
    write_openapi(openapi_path)
    click.echo(
        f"Fleet API docs: {openapi_path} (OpenAPI document of the API each scenario ran); live at "
        "http://127.0.0.1:8080/docs while `edgefleet fleet serve` runs (reference: docs/fleet-api.md)"
    )
    if serve:
        # Imported when asked for, like the scenario modules: it brings the whole fleet service,
        # which `sim list` and `--help` should not pay for.
        serve_live = importlib.import_module("simulators.demo_serve").serve_live
        try:
            serve_live(broker_url, prefer_embedded, devices, click.echo)
        except FleetError as exc:
            raise click.ClickException(str(exc)) from None
    if not verdicts or not all(v.passed for v in verdicts):
        raise SystemExit(1)
