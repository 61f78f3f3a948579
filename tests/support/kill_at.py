"""`python -m tests.support.kill_at STATE ARGS...`: the real `edgefleet` CLI, dying at a lifecycle state.

Why a launcher: crash recovery from every lifecycle state is proven with a real daemon process
killed exactly where a crash would leave it, and the product must not carry a hook for that.
This wraps `StateStore.save`, the lifecycle's state-save seam (every state is persisted
through it before that state's work starts), then runs `agent.cli` with ARGS unchanged
(e.g. `--log-json agent run --config FILE`). Right after a record whose state is STATE is on
disk, the process SIGKILLs itself: before the daemon publishes that state and before the
state's work, the point where the daemon's own test hook used to kill it.

Run it with the repository root as cwd (tests set cwd and PYTHONPATH there): `tests` is a
package of the checkout, not of the installed distribution.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from agent.cli.main import main
from agent.lifecycle.state_store import StateRecord, StateStore
from agent.logs import log_event

log = logging.getLogger("edgefleet.test")


def die_after_saving(state: str) -> None:
    """Make every `StateStore.save` of a record in `state` end the process with SIGKILL."""
    save = StateStore.save

    def save_then_die(self: StateStore, record: StateRecord) -> None:
        save(self, record)
        if record.state == state:
            log_event(log, "agent.test_kill", logging.WARNING, state=record.state)
            os.kill(os.getpid(), signal.SIGKILL)

    StateStore.save = save_then_die  # type: ignore[method-assign]


if __name__ == "__main__":
    die_after_saving(sys.argv[1])
    main(sys.argv[2:])
