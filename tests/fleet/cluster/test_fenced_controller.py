"""The rollout controller behind the lease: a standby does nothing, and a leader whose lease
was taken over while it was paused (its own clock still says it leads) has its writes refused
by the fencing token; events stored by ingest are applied once, by the leader, with its token."""

from __future__ import annotations

import pytest

from agent.contract.protocol import Event
from fleet.cluster.leader import LeaderElector
from fleet.delivery.event_log import EventLog
from fleet.rollouts.controller import RolloutController
from fleet.rollouts.controller_ports import ControllerConfig
from tests.support.rollout_world import V2, World
from tests.support.rollout_world import world as world  # the fixture


class FrozenClock:
    """A paused process's view of time: it never sees its lease expire."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _controller(w: World, elector: LeaderElector, log: EventLog) -> RolloutController:
    return RolloutController(w.store, w.repo, w.signer, w.pub, w.clock, ControllerConfig(tick_s=0.05),
                             metrics=w, leadership=elector, event_log=log)


@pytest.mark.integration
def test_a_standby_does_nothing_and_a_stale_leader_is_fenced(world: World) -> None:
    w = world
    w.enroll("d0", "d1", "d2", "d3")
    log = EventLog(w.store, w.clock)
    frozen = FrozenClock(w.clock.now)
    a = LeaderElector(w.store, holder="a", ttl_s=5.0, clock=frozen)
    b = LeaderElector(w.store, holder="b", ttl_s=5.0, clock=w.clock)
    ctl_a, ctl_b = _controller(w, a, log), _controller(w, b, log)
    rid = w.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 0})
    a.step()
    b.step()
    ctl_b.tick()  # standby: nothing happens
    assert w.state(rid) == ("pending", 0) and not w.pub.docs
    ctl_a.tick()
    first = w.assigned(rid)
    assert w.state(rid) == ("running", 0) and len(first) == 2
    w.clock.advance(6)  # a is paused past its lease; its own clock stands still
    assert b.step().value == "acquire" and a.is_leader()  # a does not know yet
    w.commit_all(first)
    for dev in first:
        log.record(dev, Event(type="committed", bundle_id=V2, timestamp=w.clock.now, seq=1))
    before = w.devices(rid)
    ctl_a.tick()  # every write checks the token in its transaction: refused, rolled back
    assert w.devices(rid) == before and w.state(rid) == ("running", 0)
    assert len(log.open_events()) == 2  # not marked handled by the stale leader
    ctl_b.tick()
    ctl_b.tick()
    assert w.state(rid)[1] == 1 and log.open_events() == []  # the new leader moved on
    with w.store.read() as db:
        assert db.execute("SELECT DISTINCT handled_token FROM device_events").fetchall() == [(2,)]
