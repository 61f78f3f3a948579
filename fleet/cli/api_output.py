"""What the operator groups share: connection options, the session, tables for people, JSON for scripts.

Why here and not in each group: every command takes the same `--url`, `--api-key` and
`--json`, and prints in the same two ways; a script written against one group's `--json`
works the same way against the others (lists print one JSON array of every item, across
pages; single resources print the API's object).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote as url_quote

import click
from rich.console import Console
from rich.table import Table

from fleet.cli.api_client import KEY_ENV, URL_ENV, ApiClient, ApiError, resolve_target

Column = tuple[str, str | Callable[[dict[str, Any]], Any]]
CONTEXT = {"help_option_names": ["-h", "--help"]}


@dataclass
class Session:
    """One command's connection and output mode."""

    client: ApiClient
    as_json: bool
    console: Console

    def json(self, data: Any) -> None:
        click.echo(json.dumps(data, indent=2, default=str))

    def note(self, message: str) -> None:
        """A line for people on stderr (stdout stays the data, also in table mode)."""
        click.echo(message, err=True)

    def show_list(self, items: Iterable[dict[str, Any]], columns: Sequence[Column], title: str) -> None:
        rows = list(items)
        if self.as_json:
            self.json(rows)
            return
        if not rows:
            self.note(f"no {title}")
            return
        table = Table(title=None, show_lines=False, header_style="bold")
        for header, _ in columns:
            table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(_value(row, key)) for _, key in columns))
        self.console.print(table)

    def show_record(self, row: dict[str, Any], fields: Sequence[Column] | None = None) -> None:
        if self.as_json:
            self.json(row)
            return
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column("field", style="bold", no_wrap=True)
        table.add_column("value", overflow="fold")
        for header, key in fields or [(k, k) for k in row]:
            table.add_row(header, _cell(_value(row, key)))
        self.console.print(table)


def _value(row: dict[str, Any], key: str | Callable[[dict[str, Any]], Any]) -> Any:
    return key(row) if callable(key) else row.get(key)


def _cell(value: Any) -> str:
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def api_command(fn: Callable[..., None]) -> Callable[..., None]:
    """Add `--url`, `--api-key` and `--json` and call `fn(session, **options)` with an open client."""

    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")
    @click.option("--api-key", default=None, metavar="KEY",
                  help=f"API key (efk_...); else ${KEY_ENV}, else api_key in the config file.")
    @click.option("--url", default=None, metavar="URL",
                  help=f"Fleet API base URL; else ${URL_ENV}, else the config file, else http://127.0.0.1:8080.")
    @functools.wraps(fn)
    def wrapper(url: str | None, api_key: str | None, as_json: bool, **kwargs: Any) -> None:
        target = resolve_target(url, api_key)
        # Not a terminal (a pipe, a file): wide lines, so no row is folded for grep.
        console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)
        with ApiClient(target) as client:
            fn(Session(client, as_json, console), **kwargs)

    return wrapper


# -- option helpers ------------------------------------------------------------------------------
limit_option = click.option("--limit", type=click.IntRange(1), default=None,
                            help="Show at most this many items (default: every page).")


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """`k=v,k2=v2` as a dict; raises click.BadParameter naming the bad pair."""
    pairs: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint=what)
        pairs[key.strip()] = value.strip()
    return pairs


def json_argument(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object given inline or as `@file`; raises click.BadParameter when it is not one."""
    if not text:
        return {}
    try:
        raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
        doc = json.loads(raw)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {text[1:]}: {exc.strerror}", param_hint=what) from None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=what) from None
    if not isinstance(doc, dict):
        raise click.BadParameter("must be a JSON object", param_hint=what)
    return doc


def quote(segment: str) -> str:
    """A path segment for a URL (an id with `/` or `?` must not reach another route)."""
    return url_quote(segment, safe="")


__all__ = ["CONTEXT", "ApiError", "Column", "Session", "api_command", "json_argument", "limit_option",
           "parse_pairs", "quote"]
