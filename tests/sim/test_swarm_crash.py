"""A swarm worker that crashes (not killed on purpose) fails the scenario at once."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from fleet.errors import FleetTransportError
from simulators.swarm import Swarm, _Worker, make_profiles


def _worker_pair(exit_code: int) -> tuple[Swarm, mp.connection.Connection]:
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=os._exit, args=(exit_code,))  # a real process that dies at once
    proc.start()
    proc.join(30)
    parent, child = ctx.Pipe()
    child.close()
    swarm = Swarm.__new__(Swarm)  # only the worker table matters to check_alive
    swarm.workers = [_Worker(0, make_profiles(7), proc=proc, conn=parent)]
    return swarm, parent


@pytest.mark.integration
def test_a_crashed_worker_is_named_with_its_exit_code() -> None:
    swarm, conn = _worker_pair(3)
    with pytest.raises(FleetTransportError, match=r"worker 0 died \(exit code 3\) with devices dev-00000, "):
        swarm.check_alive()
    conn.close()
    swarm.workers[0].conn = None  # what kill_worker leaves: a death on purpose is not a crash
    swarm.check_alive()
