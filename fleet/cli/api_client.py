"""HTTP client of the operator CLI (`edgefleet models|devices|rollouts|experiments|alerts`).

Why one module for it: every operator group talks to a running `edgefleet fleet serve` the
same way, so where the API is and which key to send (flag, then environment, then config
file), how lists are paged through cursors, and how a failed request becomes one line with a
stable exit code (never a traceback) are decided once here. The groups only name routes.

Where the settings come from, first match wins:

| setting | flag | environment | config file key |
|---|---|---|---|
| API URL | `--url` | `EDGEFLEET_URL` | `url` (default `http://127.0.0.1:8080`) |
| API key | `--api-key` | `EDGEFLEET_API_KEY` | `api_key` |

The config file is TOML at `$EDGEFLEET_CONFIG`, else `$XDG_CONFIG_HOME/edgefleet/cli.toml`
(`~/.config/edgefleet/cli.toml`). It holds a secret, so a file that other users may read is
used with a warning on stderr (`chmod 600` it).
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import click
import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "EDGEFLEET_URL"
KEY_ENV = "EDGEFLEET_API_KEY"
CONFIG_ENV = "EDGEFLEET_CONFIG"
CONFIG_KEYS = {"url", "api_key", "timeout_s"}
DEFAULT_TIMEOUT_S = 30.0

# Exit codes a script can branch on (click itself uses 1 for other errors and 2 for usage).
EXIT_ERROR = 1
EXIT_CONNECT = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5
EXIT_CONFLICT = 6
EXIT_INVALID = 7
_STATUS_EXIT = {400: EXIT_INVALID, 401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_NOT_FOUND,
                409: EXIT_CONFLICT, 413: EXIT_INVALID, 422: EXIT_INVALID}
_STATUS_WORDS = {400: "refused input", 401: "not authorised", 403: "forbidden", 404: "not found",
                 409: "refused", 413: "too large", 422: "invalid input"}


class ApiError(click.ClickException):
    """A one-line failure of an API call (click prints `Error: <message>`, no traceback)."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR, status: int | None = None) -> None:
        super().__init__(message)
        # click types `exit_code` as a class variable but reads it from the instance.
        self.exit_code = exit_code  # type: ignore[misc]
        self.status = status


@dataclass(frozen=True)
class Target:
    """Where to send requests and with which key; `key_source` names where the key came from."""

    url: str
    api_key: str | None
    key_source: str
    config_path: Path
    timeout_s: float = DEFAULT_TIMEOUT_S


def config_path(environ: Mapping[str, str]) -> Path:
    """The config file this environment points at (it need not exist)."""
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]).expanduser()
    base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "edgefleet" / "cli.toml"


def read_config(path: Path, required: bool) -> dict[str, Any]:
    """The config file's settings ({} when absent and not `required`); warns if others may read it."""
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise ApiError(f"config file {path} (from {CONFIG_ENV}) does not exist") from None
        return {}
    except OSError as exc:
        raise ApiError(f"cannot read config file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        click.echo(f"warning: {path} is mode {stat.S_IMODE(mode):04o} and holds an API key; "
                   f"run `chmod 600 {path}`", err=True)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ApiError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - CONFIG_KEYS)
    if unknown:  # a typo must not silently fall back to a default
        raise ApiError(f"config file {path}: unknown key(s) {', '.join(unknown)} "
                       f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    for key in ("url", "api_key"):
        if key in doc and not isinstance(doc[key], str):
            raise ApiError(f"config file {path}: {key} must be a string")
    if "timeout_s" in doc and (not isinstance(doc["timeout_s"], int | float) or doc["timeout_s"] <= 0):
        raise ApiError(f"config file {path}: timeout_s must be a positive number")
    return doc


def resolve_target(url: str | None, api_key: str | None,
                   environ: Mapping[str, str] | None = None) -> Target:
    """Combine flags, environment and config file (in that order) into a `Target`."""
    env = os.environ if environ is None else environ
    path = config_path(env)
    file_cfg = read_config(path, required=bool(env.get(CONFIG_ENV)))
    chosen_url = url or env.get(URL_ENV) or file_cfg.get("url") or DEFAULT_URL
    if api_key:
        key, source = api_key, "--api-key"
    elif env.get(KEY_ENV):
        key, source = env[KEY_ENV], KEY_ENV
    elif file_cfg.get("api_key"):
        key, source = file_cfg["api_key"], str(path)
    else:
        key, source = None, "none"
    parts = urlsplit(chosen_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(f"fleet API URL {chosen_url!r} is not http(s)://host[:port]", EXIT_ERROR)
    timeout = float(file_cfg.get("timeout_s", DEFAULT_TIMEOUT_S))
    return Target(chosen_url.rstrip("/"), key, source, path, timeout)


def _detail(response: httpx.Response) -> str:
    """The API's `detail` as one line: a sentence, or `field: problem; ...` for schema errors."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
                parts.append(f"{'.'.join(loc) or 'request'}: {item.get('msg', item)}")
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


class ApiClient:
    """A thin synchronous client: one `httpx.Client`, errors raised as `ApiError`."""

    def __init__(self, target: Target, transport: httpx.BaseTransport | None = None) -> None:
        self.target = target
        headers = {"Accept": "application/json", "User-Agent": "edgefleet-cli"}
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        self._http = httpx.Client(base_url=target.url, headers=headers, timeout=target.timeout_s,
                                  transport=transport)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                content: IO[bytes] | bytes | None = None, headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> Any:
        """Send one request and return the decoded JSON body (None for 204). Raises ApiError."""
        if not self.target.api_key:
            raise ApiError(f"no API key: pass --api-key, set {KEY_ENV}, or put api_key in "
                           f"{self.target.config_path}", EXIT_AUTH)
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(
                method, path, json=json, params=query, content=content, headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.ConnectError as exc:
            raise ApiError(f"cannot connect to the fleet API at {self.target.url}: {_reason(exc)} "
                           "(is `edgefleet fleet serve` running there?)", EXIT_CONNECT) from None
        except httpx.TimeoutException:
            raise ApiError(f"the fleet API at {self.target.url} did not answer in time "
                           f"({timeout or self.target.timeout_s:g} s)", EXIT_CONNECT) from None
        except httpx.HTTPError as exc:
            raise ApiError(f"request to {self.target.url}{path} failed: {_reason(exc)}",
                           EXIT_CONNECT) from None
        if response.status_code >= 400:
            raise self._error(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ApiError(f"{self.target.url}{path} answered {response.status_code} with a body that "
                           "is not JSON (is this URL the fleet API?)") from None

    def get_bytes(self, path: str) -> bytes:
        """GET a binary body (a dataset export). Raises ApiError."""
        if not self.target.api_key:
            raise ApiError(f"no API key: pass --api-key or set {KEY_ENV}", EXIT_AUTH)
        try:
            response = self._http.get(path, headers={"Accept": "application/octet-stream"})
        except httpx.HTTPError as exc:
            raise ApiError(f"request to {self.target.url}{path} failed: {_reason(exc)}",
                           EXIT_CONNECT) from None
        if response.status_code >= 400:
            raise self._error(response)
        return response.content

    def _error(self, response: httpx.Response) -> ApiError:
        code = response.status_code
        detail = _detail(response)
        words = _STATUS_WORDS.get(code, "server error" if code >= 500 else "HTTP error")
        message = f"{words} ({code}): {detail}"
        if code == 401:
            message += f" [API key from {self.target.key_source}]"
        return ApiError(message, _STATUS_EXIT.get(code, EXIT_ERROR), code)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.request("POST", path, json={} if body is None else body, headers=headers)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def pages(self, path: str, limit: int | None = None, page_size: int | None = None,
              **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a paged list, following `next_cursor`, stopping after `limit` items."""
        cursor: str | None = None
        seen = 0
        while True:
            size = page_size
            if limit is not None and size is not None:
                size = min(size, limit - seen)
            page = self.get(path, **params, limit=size, cursor=cursor)
            for item in page.get("items", []):
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield item
            cursor = page.get("next_cursor")
            if not cursor or (limit is not None and seen >= limit):
                return


def _reason(exc: Exception) -> str:
    """The innermost cause of a transport error as text (e.g. `[Errno 111] Connection refused`)."""
    text = str(exc)
    inner: BaseException | None = exc
    while inner is not None and inner.__cause__ is not None:
        inner = inner.__cause__
        text = str(inner) or text
    return text or type(exc).__name__
