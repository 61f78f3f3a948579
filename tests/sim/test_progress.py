"""`sim run` / `demo` progress: logs go to the file named on start, the terminal gets a live view
(a terminal) or a few plain lines (CI, pipes), then the summary.

A registered stand-in scenario logs hundreds of events and reports progress like the real ones
(`ctx.progress`), so the suite machinery (`run_suite`, the CLI) runs end to end without a swarm;
the broker is given (`--broker`), so none is started.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from agent.logs import configure_logging, log_event
from simulators import scenarios
from simulators.cli import demo_command, run_suite, sim_group
from simulators.progress import SWARM_LOG_FILE_ENV, log_to_file
from simulators.scenarios import Scenario, ScenarioContext, Verdict

LOG_LINES = 300
log = logging.getLogger("edgefleet.test.progress")


def _chatty(ctx: ScenarioContext) -> Verdict:
    ctx.progress("starting 5 devices", 0, ctx.devices)
    for i in range(LOG_LINES):
        log_event(log, "fake.tick", i=i)
    log_event(log, "fake.warning", logging.WARNING, why="seen in the file, not on the terminal")
    for done in range(ctx.devices + 1):
        ctx.progress("devices on mlp-2.0.0", done, ctx.devices)
    return Verdict("chatty", True, "every device answered", {"devices": float(ctx.devices)})


@pytest.fixture
def chatty(monkeypatch: pytest.MonkeyPatch) -> str:
    scenarios._load_all()  # the real ones first, so the stand-in is not overwritten by a late import
    monkeypatch.setitem(scenarios.REGISTRY, "chatty", Scenario(99, "chatty", "logs a lot", _chatty))
    return "chatty"


@pytest.mark.unit
def test_sim_run_off_a_terminal_prints_a_few_lines_and_logs_to_the_named_file(chatty: str,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "reports" / "verdicts.json"
    out.parent.mkdir()
    res = CliRunner().invoke(sim_group, ["run", "--scenario", chatty, "--devices", "5",
                                         "--broker", "mqtt://127.0.0.1:1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    logfile = tmp_path / "reports" / "sim.log"  # default: beside the reports
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[0] == f"logs: {logfile}"
    assert "[1/1] chatty (5 devices) ..." in lines and any(line.startswith("PASS chatty") for line in lines)
    assert "fake.tick" not in res.output and "fake.warning" not in res.output
    assert len(lines) < 20, res.output  # plain and short: no stage lines, no log lines
    assert "edgefleet scenarios" in res.output  # the summary table
    logged = logfile.read_text()
    assert logged.count("fake.tick") == LOG_LINES and "fake.warning" in logged and "scenario.start" in logged
    assert json.loads(out.read_text())["scenarios"][0]["passed"]


@pytest.mark.unit
def test_on_a_terminal_the_live_view_shows_scenario_stage_and_devices(chatty: str, tmp_path: Path) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    verdicts = run_suite(names=[chatty], max_number=None, devices=5, processes=1,
                         broker_url="mqtt://127.0.0.1:1", json_path=None, html_path=None,
                         console=console, log_path=tmp_path / "demo.log")
    assert [v.passed for v in verdicts] == [True]
    shown = screen.getvalue()
    assert f"logs: {tmp_path / 'demo.log'}" in shown
    assert "scenario 1/1: chatty" in shown and "chatty: devices on mlp-2.0.0" in shown and "5/5" in shown
    assert "PASS chatty" in shown and "fake.tick" not in shown
    assert (tmp_path / "demo.log").read_text().count("fake.tick") == LOG_LINES


@pytest.mark.unit
def test_log_to_file_puts_the_terminal_handler_back(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING")
    try:
        with log_to_file(tmp_path / "x.log") as path:
            log_event(log, "inside", logging.WARNING)
            assert os.environ[SWARM_LOG_FILE_ENV] == str(path)  # the swarm's workers follow
        log_event(log, "after", logging.WARNING)
        assert "inside" in path.read_text() and "after" not in path.read_text()
        err = capsys.readouterr().err
        assert "after" in err and "inside" not in err
        assert logging.getLogger().level == logging.WARNING and SWARM_LOG_FILE_ENV not in os.environ
    finally:
        for handler in [h for h in logging.getLogger().handlers if getattr(h, "_edgefleet", False)]:
            logging.getLogger().removeHandler(handler)


@pytest.mark.unit
def test_demo_and_sim_run_name_their_log_file_option() -> None:
    for command, default in ((demo_command, "demo.log"), (sim_group, "sim.log")):
        args = ["--help"] if command is demo_command else ["run", "--help"]
        shown = CliRunner().invoke(command, args).output
        assert "--log-file" in shown and default in shown
