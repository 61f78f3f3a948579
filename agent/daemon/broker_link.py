"""What the agent knows about its broker connection: logged on every change, kept for `agent status`.

Why: offline first means an agent that cannot reach its broker keeps serving and looks
healthy, while the fleet hears nothing from it (no reported state, no events, no telemetry).
An operator must be able to see that without reading DEBUG logs: the agent logs
`agent.broker_connected` (INFO), `agent.broker_lost` and `agent.broker_unreachable` (WARNING,
once per outage; later failed attempts at DEBUG), and writes `<state_dir>/broker.json`
(state, broker, since, last error, pid), which `edgefleet agent status` shows. The file is
advisory, replaced atomically but not fsynced (after a power cut it is rewritten at start);
the pid tells a status reader whether the agent that wrote it still runs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.logs import log_event

log = logging.getLogger("edgefleet.agent")
STATUS_FILE = "broker.json"


@dataclass(frozen=True)
class BrokerStatus:
    """One line of truth about the link: `connecting`, `connected`, `disconnected` or `stopped`."""

    state: str
    broker: str
    since: float  # wall-clock time of the last change of `state`
    last_error: str | None
    connects: int
    pid: int

    @classmethod
    def read(cls, state_dir: Path) -> BrokerStatus | None:
        """The status the agent last wrote into `state_dir`, or None (never ran, unreadable)."""
        try:
            doc = json.loads((Path(state_dir) / STATUS_FILE).read_text())
            return cls(str(doc["state"]), str(doc["broker"]), float(doc["since"]),
                       doc.get("last_error"), int(doc.get("connects", 0)), int(doc["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float, running: bool | None = None) -> str:
        """For people: `connected to host:port since 12:00:01 (5m)`, ... (`running`: pid alive)."""
        running = pid_alive(self.pid) if running is None else running
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        ago = _ago(now - self.since)
        error = f" ({self.last_error})" if self.last_error else ""
        if self.state == "stopped":
            return f"agent stopped at {at}; it was using {self.broker}"
        if not running:
            return f"agent not running (pid {self.pid} is gone); last seen {self.state}, {self.broker}{error}"
        if self.state == "connected":
            return f"connected to {self.broker} since {at} ({ago})"
        if self.connects == 0:
            return f"never connected to {self.broker}, trying since {at} ({ago}){error}"
        return f"disconnected from {self.broker} since {at} ({ago}){error}; reconnecting"


class BrokerLink:
    """Tracks the link from the transport's callbacks (any thread); thread-safe."""

    def __init__(self, state_dir: Path, broker: str, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / STATUS_FILE
        self.broker = broker
        self._clock = clock
        self._lock = threading.Lock()
        self._status = BrokerStatus("connecting", broker, clock(), None, 0, os.getpid())
        self._failures = 0  # failed attempts in the current outage

    @property
    def status(self) -> BrokerStatus:
        with self._lock:
            return self._status

    def connecting(self) -> None:
        """The agent starts connecting (written so `agent status` never shows a stale run)."""
        log_event(log, "agent.broker_connecting", broker=self.broker)
        self._set("connecting", None)

    def connected(self, session_present: bool) -> None:
        with self._lock:
            outage_s = self._clock() - self._status.since if self._status.state != "connected" else 0.0
            self._failures = 0
        self._set("connected", None, connected=True)  # the file first: a reader of the log sees it
        log_event(log, "agent.broker_connected", broker=self.broker, session_present=session_present,
                  after_s=round(outage_s, 1))

    def down(self, reason: str, was_connected: bool) -> None:
        """A lost connection (`was_connected`) or a failed attempt; `MqttTransport.add_on_link_down`."""
        with self._lock:
            self._failures += 1
            attempts = self._failures
            state = self._status.state
        if was_connected:
            self._set("disconnected", reason)
            log_event(log, "agent.broker_lost", logging.WARNING, broker=self.broker, reason=reason)
            return
        self._set("connecting" if state == "connecting" else "disconnected", reason, keep_since=True)
        level = logging.WARNING if attempts == 1 else logging.DEBUG  # once per outage, not every retry
        log_event(log, "agent.broker_unreachable", level, broker=self.broker, reason=reason,
                  attempts=attempts)

    def stopped(self) -> None:
        self._set("stopped", None)

    def _set(self, state: str, error: str | None, connected: bool = False, keep_since: bool = False) -> None:
        with self._lock:
            old = self._status
            since = old.since if keep_since or state == old.state else self._clock()
            self._status = BrokerStatus(state, self.broker, since, error, old.connects + int(connected),
                                        old.pid)
            data = json.dumps(asdict(self._status), sort_keys=True)
            try:  # advisory: never let a status file stop the agent
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text(data)
                tmp.replace(self.path)
            except OSError as exc:
                log_event(log, "agent.broker_status_unwritten", logging.DEBUG, error=str(exc))


def pid_alive(pid: int) -> bool:
    """True if a process `pid` exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
