"""Make Mosquitto apply the password file the fleet just rewrote.

Mosquitto reads `password_file` at start and on SIGHUP only, so a rewrite changes nothing
until the broker is told. On that reload Mosquitto 2.0 also re-checks every connected client
against the new file and disconnects those whose username is gone (measured with 2.0.11 in
`tests/fleet/devices/test_fleet_revocation.py`), so one SIGHUP both refuses a revoked device's next CONNECT
and cuts its open session.

Two hooks, from `FleetSettings`: `broker_pid_file` (SIGHUP to the pid it holds) and
`broker_reload_command` (an argv such as `systemctl reload mosquitto`). Both run when both
are set. A failure is logged and returned, never raised: the store already holds the
revocation, and the operator must learn that the broker has not applied it yet.

The warning (`fleet.broker.reload_failed`) names what it means in practice (`IMPACT`). It is
logged at DEBUG instead when the fleet logs in to the broker without a password
(`broker_password_file`, `broker_password` or a password in `broker_url`) and no hook is
configured: a broker that takes the fleet without a password does not use the password file
(a development broker), so there is nothing for the operator to do.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.logs import log_event
from fleet.devices.enrollment import sync_broker_credentials
from fleet.settings import FleetSettings
from fleet.store import Store

logger = logging.getLogger("edgefleet.fleet.broker")
MAX_PID_FILE_BYTES = 64
NOT_CONFIGURED = "no broker reload hook configured (set broker_pid_file or broker_reload_command)"
IMPACT = ("devices enrolled since the last broker restart cannot connect until Mosquitto reloads its "
          "password file, and revoked devices can")


@dataclass(frozen=True)
class BrokerReload:
    """Outcome of one reload attempt: `reloaded` only when every configured hook succeeded."""

    reloaded: bool
    detail: str


def _signal_pid_file(path: Path) -> str | None:
    """SIGHUP the pid in `path`; returns an error message or None."""
    try:
        raw = path.read_bytes()[:MAX_PID_FILE_BYTES + 1]
    except OSError as exc:
        return f"cannot read pid file {path}: {exc.strerror or exc}"
    text = raw.decode("ascii", "replace").strip()
    if len(raw) > MAX_PID_FILE_BYTES or not text.isdigit() or int(text) <= 1:
        return f"pid file {path} does not hold a process id: {text[:32]!r}"
    try:
        os.kill(int(text), signal.SIGHUP)
    except ProcessLookupError:
        return f"no process {text} (pid file {path} is stale)"
    except PermissionError:
        return f"not permitted to signal process {text}"
    return None


def _run_command(argv: tuple[str, ...], timeout_s: float) -> str | None:
    """Run the reload command; returns an error message or None."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        return f"reload command not found: {argv[0]}"
    except subprocess.TimeoutExpired:
        return f"reload command {' '.join(argv)} did not finish within {timeout_s:g}s"
    except OSError as exc:
        return f"reload command {argv[0]} failed to start: {exc}"
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode("utf-8", "replace").strip()[-300:]
        return f"reload command exited with {done.returncode}: {err or 'no output'}"
    return None


def reload_broker(settings: FleetSettings) -> BrokerReload:
    """Run the configured reload hooks; never raises. Logs the outcome (warning when not applied)."""
    done: list[str] = []
    errors: list[str] = []
    if settings.broker_pid_file is not None:
        err = _signal_pid_file(settings.broker_pid_file)
        if err:
            errors.append(err)
        else:
            done.append(f"SIGHUP via {settings.broker_pid_file}")
    if settings.broker_reload_command:
        err = _run_command(settings.broker_reload_command, settings.broker_reload_timeout_s)
        if err:
            errors.append(err)
        else:
            done.append(f"ran {' '.join(settings.broker_reload_command)}")
    if not done and not errors:
        result = BrokerReload(False, NOT_CONFIGURED)
    elif errors:
        result = BrokerReload(False, "; ".join(errors + done))
    else:
        result = BrokerReload(True, "; ".join(done))
    if result.reloaded:
        log_event(logger, "fleet.broker.reloaded", detail=result.detail)
    else:
        level = logging.WARNING if errors or password_file_in_use(settings) else logging.DEBUG
        log_event(logger, "fleet.broker.reload_failed", level, detail=result.detail, impact=IMPACT)
    return result


def password_file_in_use(settings: FleetSettings) -> bool:
    """Whether the broker checks passwords: the fleet logs in with one (from a file, a setting or the URL)."""
    return settings.broker_password is not None or urlsplit(settings.broker_url).password is not None


def apply_broker_credentials(store: Store, settings: FleetSettings) -> BrokerReload:
    """Rewrite the password file from the store, then reload the broker.

    Raises OSError when the password file cannot be written (nothing to reload then);
    reload failures are returned, not raised.
    """
    sync_broker_credentials(store, settings.broker_passwd_path)
    return reload_broker(settings)
