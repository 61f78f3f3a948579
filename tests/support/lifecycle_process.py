"""A small process that runs the real lifecycle, for kill-the-process tests.

`python -m tests.support.lifecycle_process CONFIG.json` (cwd at the repository root) builds a
`Lifecycle` from a JSON config (state dir, TUF paths of a `DirectoryFetcher` repository, an
optional desired target, a probe input), runs it until stable and prints one JSON line: the
final state, the record's pointers and the served model's output for the probe. With
`EDGEFLEET_HARNESS_PAUSE_AT=<state>` it prints `paused <state>` when it *enters* that state
(after the record was saved) and sleeps, so a test can SIGKILL it there exactly as a crash
would. A test driver, so it lives with the tests: the product package ships none.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.lifecycle.context import LifecycleConfig
from agent.lifecycle.install import HANDLERS
from agent.lifecycle.machine import Event, State
from agent.lifecycle.runner import Lifecycle
from agent.lifecycle.state_store import DesiredTarget
from agent.serving.model_holder import ModelHolder
from agent.trust import DirectoryFetcher, TrustClient

PAUSE_ENV = "EDGEFLEET_HARNESS_PAUSE_AT"


def main(argv: list[str]) -> int:
    cfg: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    fetcher = DirectoryFetcher(Path(cfg["repo_dir"]))
    trust = TrustClient(
        Path(cfg["device_dir"]) / "tuf/metadata",
        Path(cfg["device_dir"]) / "tuf/targets",
        fetcher,
        fetcher.url_for("metadata"),
        fetcher.url_for("targets"),
        bootstrap_root=Path(cfg["bootstrap_root"]).read_bytes(),
    )
    holder = ModelHolder()
    config = LifecycleConfig(state_dir=Path(cfg["device_dir"]) / "state", probation_poll_s=0.002)
    lc = Lifecycle(config, holder, trust, lambda name, fields: print(f"event {name}", flush=True))
    pause_at = os.environ.get(PAUSE_ENV)
    if pause_at:
        state = State(pause_at)
        real = HANDLERS[state]

        def pause(ctx: Any) -> Event:
            print(f"paused {state.value}", flush=True)
            time.sleep(3600)
            return real(ctx)

        lc.machine.handlers[state] = pause
    if cfg.get("desired"):
        lc.offer_desired(DesiredTarget.from_dict(cfg["desired"]))
    final = lc.start()
    probe = np.asarray(cfg["probe"], dtype=np.float32)
    rec = lc.record
    out = holder.predict({"x": probe})["logits"].tolist() if holder.bundle_id else None
    result = {
        "state": final.value,
        "active": rec.active,
        "previous": rec.previous,
        "serving": holder.bundle_id,
        "quarantined": rec.quarantined,
        "output": out,
    }
    print(json.dumps(result), flush=True)
    holder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
