"""The leader lease: the pure decision, the compare-and-swap, the fencing token and the audit
of a hand-over, with an injected clock (no sleeping)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.cluster.leader import LeaderElector
from fleet.cluster.lease import LeaseLost, LeaseRepo, LeaseRow, Verdict, decide
from fleet.errors import FleetInputError
from fleet.store import Store


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.unit
def test_decide_covers_free_held_ours_and_expired() -> None:
    free = LeaseRow("c", "", 0, 0.0)
    assert decide(free, "a", 10, 5) == decide(free, "a", 10, 5)
    d = decide(free, "a", 10, 5)
    assert d.verdict is Verdict.ACQUIRE and d.write == LeaseRow("c", "a", 1, 15)
    held = LeaseRow("c", "b", 3, 12.0)
    assert decide(held, "a", 10, 5).verdict is Verdict.STANDBY and decide(held, "a", 10, 5).write is None
    ours = LeaseRow("c", "a", 3, 12.0)
    assert decide(ours, "a", 10, 5).write == LeaseRow("c", "a", 3, 15)  # renew keeps the token
    expired = LeaseRow("c", "b", 3, 10.0)  # expires_at == now: expired
    assert decide(expired, "a", 10, 5).write == LeaseRow("c", "a", 4, 15)
    ours_expired = LeaseRow("c", "a", 3, 9.0)  # a late renewal: nobody took it, the token stays
    assert decide(ours_expired, "a", 10, 5) == decide(ours, "a", 10, 5)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "fleet.db")
    yield s
    s.close()


@pytest.mark.integration
def test_compare_and_swap_lets_one_of_two_racers_win(store: Store) -> None:
    repo = LeaseRepo(store)
    seen = repo.read("controller")
    assert repo.swap(seen, LeaseRow("controller", "a", 1, 100.0))
    assert not repo.swap(seen, LeaseRow("controller", "b", 1, 100.0))  # read the same row: loses
    assert repo.read("controller") == LeaseRow("controller", "a", 1, 100.0)


@pytest.mark.integration
def test_standby_takes_over_after_the_ttl_and_the_stale_leader_is_fenced(store: Store) -> None:
    clock = Clock()
    a = LeaderElector(store, holder="a", ttl_s=5.0, clock=clock)
    b = LeaderElector(store, holder="b", ttl_s=5.0, clock=clock)
    assert a.step() is Verdict.ACQUIRE and a.is_leader() and a.fence() == 1
    assert b.step() is Verdict.STANDBY and not b.is_leader()
    clock.now += 4
    assert a.step() is Verdict.RENEW  # renewed at 1004: valid until 1009
    clock.now += 4.9
    assert b.step() is Verdict.STANDBY
    clock.now += 0.2  # a stopped renewing (killed, paused): expired at 1009
    assert not a.is_leader()
    assert b.step() is Verdict.ACQUIRE and b.token == 2
    with pytest.raises(LeaseLost):
        a.fence()  # locally expired
    with pytest.raises(LeaseLost), store.tx():  # even if its clock lied: the database says token 2
        a.repo.check_fence("controller", 1)
    assert a.step() is Verdict.STANDBY and a.token is None
    entries = store.audit.list(None, 10, action="leader.acquired").items
    assert [(e.actor, e.before["holder"], e.after["fencing_token"]) for e in entries] == [
        ("b", "a", 2), ("a", None, 1)]


@pytest.mark.integration
def test_a_clean_stop_releases_the_lease_at_once(store: Store) -> None:
    clock = Clock()
    a = LeaderElector(store, holder="a", ttl_s=5.0, clock=clock)
    b = LeaderElector(store, holder="b", ttl_s=5.0, clock=clock)
    a.step()
    a.stop()
    assert b.step() is Verdict.ACQUIRE  # no TTL to wait
    assert not a.is_leader()


@pytest.mark.integration
def test_a_silly_ttl_is_refused(store: Store) -> None:
    with pytest.raises(FleetInputError):
        LeaderElector(store, ttl_s=0.0)
