"""Device events stored once per (device, seq) in the database, whichever worker got them first:
two processes racing on the same 400 events store each exactly once."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from agent.contract.protocol import Event
from fleet.delivery.event_log import DurableEvents, EventLog
from fleet.store import Store

TS = 1_767_225_600.0


def _event(dev: int, seq: int) -> Event:
    return Event(device_id=f"d{dev}", type="installed", bundle_id="m-1", timestamp=TS, seq=seq)


def _worker(path: str, start: mp.synchronize.Event, out: mp.Queue) -> None:  # type: ignore[type-arg]
    store = Store(path)
    log = EventLog(store)
    start.wait()
    won = sum(log.record(f"d{i % 20}", _event(i % 20, i // 20)) for i in range(400))
    store.close()
    out.put(won)


@pytest.mark.integration
def test_two_processes_racing_on_the_same_events_store_each_once(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    Store(path).close()  # migrated once before the race
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(path), start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    wins = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sum(wins) == 400  # every event won by exactly one worker
    store = Store(path)
    try:
        with store.read() as db:
            assert db.execute("SELECT COUNT(*), COUNT(DISTINCT device_id || ':' || seq) FROM device_events"
                              ).fetchone() == (400, 400)
    finally:
        store.close()


@pytest.mark.integration
def test_handled_events_leave_the_open_list_and_a_redelivery_never_returns(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    woken: list[int] = []
    log = EventLog(store)
    sink = DurableEvents(log, wake=lambda: woken.append(1))
    sink("d1", _event(1, 0))
    sink("d1", _event(1, 1))
    sink("d1", _event(1, 0))  # redelivered: stored once, no second wake
    assert len(woken) == 2 and log.duplicates == 1
    assert [(e.device_id, e.seq) for e in log.open_events()] == [("d1", 0), ("d1", 1)]
    log.mark_handled([("d1", 0)], token=7)
    assert [(e.seq) for e in log.open_events()] == [1]
    assert not log.record("d1", _event(1, 0))  # handled, still known: not applied again
    with store.read() as db:
        assert db.execute("SELECT handled_token FROM device_events WHERE seq = 0").fetchone()[0] == 7
    store.close()


@pytest.mark.integration
def test_a_tampered_stored_event_is_skipped_not_fatal(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    log = EventLog(store)
    log.record("d1", _event(1, 0))
    with store.tx() as db:
        db.execute("UPDATE device_events SET payload = :p WHERE seq = 0", {"p": b"{not json"})
    assert log.open_events() == []  # skipped and marked handled (token -1)
    with store.read() as db:
        assert db.execute("SELECT handled_token FROM device_events").fetchone()[0] == -1
    store.close()


@pytest.mark.integration
def test_handled_events_are_pruned_after_the_retention(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    now = [1000.0]
    log = EventLog(store, clock=lambda: now[0])
    log.record("d1", _event(1, 0))
    log.record("d1", _event(1, 1))
    log.mark_handled([("d1", 0)], token=1)  # also prunes (nothing old yet)
    now[0] += 15 * 24 * 3600
    log.record("d2", _event(2, 0))
    log.mark_handled([("d2", 0)], token=1)  # an hour has passed: prunes the handled, old d1/0
    with store.read() as db:
        left = db.execute("SELECT device_id, seq FROM device_events ORDER BY device_id, seq").fetchall()
    assert left == [("d1", 1), ("d2", 0)]  # the unhandled one stays, however old
    store.close()
