"""Run the operator CLI's click groups in-process, the way the CLI tests check them."""

from __future__ import annotations

import json
from typing import Any

import click
from click.testing import CliRunner, Result


def cli(group: click.Group, *args: str, env: dict[str, str], code: int = 0) -> Result:
    """Run one command in-process; check the exit code and that nothing escaped as a traceback."""
    result = CliRunner().invoke(group, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code == code, (args, result.output)
    return result


def as_json(group: click.Group, *args: str, env: dict[str, str]) -> Any:
    """The command's `--json` output, parsed."""
    return json.loads(cli(group, *args, "--json", env=env).stdout)
