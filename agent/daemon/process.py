"""Process-level helpers of the agent daemon: systemd notifications, a saved-record hook.

Kept apart from `agent.daemon.core` so the daemon module stays about wiring.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from agent.lifecycle.state_store import StateRecord, StateStore


@functools.cache
def agent_version() -> str:
    """The installed distribution's version (read once: it is in every reported state)."""
    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0"


class ObservedStore:
    """The lifecycle's `StateStore` plus a callback after every successful save."""

    def __init__(self, store: StateStore, after_save: Callable[[StateRecord], None]) -> None:
        self._store = store
        self._after = after_save

    def save(self, record: StateRecord) -> None:
        self._store.save(record)
        self._after(record)

    def load(self) -> StateRecord:
        return self._store.load()


class Notifier:
    """systemd notifications; a no-op when NOTIFY_SOCKET is unset (sdnotify ignores it then)."""

    def __init__(self) -> None:
        self._n: Any = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._n = sdnotify.SystemdNotifier()

    def notify(self, state: str) -> None:
        if self._n is not None:
            self._n.notify(state)
