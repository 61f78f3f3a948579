"""The process's one spinner for shared-memory replies (`agent.serving.shm_watch`), over plain
control words in memory: who spins, who is woken, who is told to park, and that nobody is
left waiting when a reply comes, a spin time ends or the spinner goes away."""

from __future__ import annotations

import random
import threading
import time

import pytest

from agent.serving.shm_layout import W_REP
from agent.serving.shm_watch import BACKSTOP_S, Waiter, Watch

pytestmark = pytest.mark.unit


def _until(cond: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def _words() -> memoryview:
    return memoryview(bytearray(64)).cast("Q")


def test_one_thread_spins_for_all_and_every_waiter_gets_its_own_reply() -> None:
    watch = Watch()
    n, rounds = 12, 40
    ctls = [_words() for _ in range(n)]
    waiters = [Waiter(c) for c in ctls]
    asked = [0] * n
    results: list[list[bool]] = [[] for _ in range(n)]
    spinners_seen: set[int] = set()

    def client(i: int) -> None:
        for r in range(1, rounds + 1):
            asked[i] = r
            results[i].append(watch.wait(waiters[i], r, 2_000_000))
            assert ctls[i][W_REP] == r  # returned only once its own reply is there

    def server() -> None:  # answers pending requests in a random order
        rng = random.Random(3)
        done = 0
        while done < n * rounds:
            pending = [i for i in range(n) if ctls[i][W_REP] < asked[i]]
            rng.shuffle(pending)
            for i in pending[:3]:
                ctls[i][W_REP] = asked[i]
                done += 1
            if watch._spinner is not None:
                spinners_seen.add(id(watch._spinner))
            time.sleep(0.0002)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    srv = threading.Thread(target=server)
    for t in (*threads, srv):
        t.start()
    for t in (*threads, srv):
        t.join(timeout=60)
    assert all(r == [True] * rounds for r in results)
    assert watch._spinner is None and watch._waiting == [] and not watch._role.locked()
    assert watch.backstops == 0  # nobody was forgotten and left to wake by its timeout
    assert len(spinners_seen) > 1  # the role moved from thread to thread


def test_a_waiter_whose_spin_time_ends_is_told_to_park_and_the_spinner_keeps_waiting() -> None:
    watch = Watch()
    a, b = Waiter(_words()), Waiter(_words())
    got: dict[str, object] = {}

    def spin_long() -> None:
        got["a"] = watch.wait(a, 1, 2_000_000)

    t = threading.Thread(target=spin_long)
    t.start()
    _until(lambda: watch._spinner is a)
    t0 = time.monotonic()
    assert watch.wait(b, 1, 20_000) is False  # 20 ms of spin time, no reply: park
    took = time.monotonic() - t0
    assert took < BACKSTOP_S + 1.0  # told by the spinner, not left to its backstop... roughly
    assert b not in watch._waiting and watch._spinner is a
    a.ctl[W_REP] = 1
    t.join(timeout=10)
    assert got["a"] is True and watch._spinner is None


def test_the_role_passes_to_a_waiter_when_the_spinners_reply_comes_first() -> None:
    watch = Watch()
    a, b = Waiter(_words()), Waiter(_words())
    got: dict[str, bool] = {}
    ta = threading.Thread(target=lambda: got.__setitem__("a", watch.wait(a, 1, 5_000_000)))
    ta.start()
    _until(lambda: watch._spinner is a)
    tb = threading.Thread(target=lambda: got.__setitem__("b", watch.wait(b, 7, 5_000_000)))
    tb.start()
    _until(lambda: b in watch._waiting)
    a.ctl[W_REP] = 1
    ta.join(timeout=10)
    assert got["a"] is True
    while watch._spinner is not b:  # b spins now, for itself
        time.sleep(0.001)
    b.ctl[W_REP] = 7
    tb.join(timeout=10)
    assert got["b"] is True and watch._spinner is None and watch._waiting == []


def test_a_waiter_whose_spinner_is_gone_looks_for_itself_at_its_backstop() -> None:
    watch = Watch()
    watch._role.acquire()  # a spinner that never hands over (a dead thread)
    me = Waiter(_words())
    me.ctl[W_REP] = 5  # its reply is there, but nobody tells it
    t0 = time.monotonic()
    assert watch.wait(me, 5, 1_000) is True
    assert time.monotonic() - t0 >= BACKSTOP_S and watch.backstops == 1
    assert me not in watch._waiting
    assert watch.wait(me, 6, 1_000) is False  # and with no reply: park
    assert me not in watch._waiting


class _Boom(Exception):
    pass


class _FlakyWords:
    """Control words that raise once a condition holds (an interrupt in the spinner's loop)."""

    def __init__(self, words: memoryview, when: object) -> None:
        self.words, self.when = words, when

    def __getitem__(self, i: int) -> int:
        if callable(self.when) and self.when():
            raise _Boom("interrupted")
        return int(self.words[i])


def test_an_interrupted_spinner_hands_the_role_to_a_waiter() -> None:
    watch = Watch()
    b = Waiter(_words())
    a = Waiter(_FlakyWords(_words(), lambda: b in watch._waiting))  # type: ignore[arg-type]
    got: dict[str, bool] = {}

    def spinner_a() -> None:
        with pytest.raises(_Boom):
            watch.wait(a, 1, 5_000_000)

    ta = threading.Thread(target=spinner_a)
    ta.start()
    _until(lambda: watch._spinner is a)
    tb = threading.Thread(target=lambda: got.__setitem__("b", watch.wait(b, 1, 5_000_000)))
    tb.start()
    ta.join(timeout=10)
    _until(lambda: watch._spinner is b)
    b.ctl[W_REP] = 1
    tb.join(timeout=10)
    assert got["b"] is True and watch._spinner is None and watch._waiting == []


class _InterruptedWaiter(Waiter):
    __slots__ = ()

    def sleep(self, timeout_s: float) -> bool:
        if timeout_s > 0:
            raise _Boom("interrupted while asleep")
        return super().sleep(timeout_s)


def test_an_interrupted_waiter_leaves_the_watch_and_the_next_wait_is_clean() -> None:
    watch = Watch()
    spinner = Waiter(_words())
    t = threading.Thread(target=lambda: watch.wait(spinner, 1, 5_000_000))
    t.start()
    _until(lambda: watch._spinner is spinner)
    me = _InterruptedWaiter(_words())
    with pytest.raises(_Boom):
        watch.wait(me, 1, 5_000_000)
    assert me not in watch._waiting
    spinner.ctl[W_REP] = 1
    t.join(timeout=10)
    assert watch._spinner is None
    me.ctl[W_REP] = 2  # nobody else waits: it spins for itself and sees its reply
    assert watch.wait(me, 2, 1_000_000) is True


def test_rapid_replies_to_many_threads_never_leave_one_to_its_backstop() -> None:
    """Replies that come at once, to threads that take and give back the role all the time:
    the windows where a thread queues just as the spinner leaves are hit thousands of times."""
    import os
    import sys

    watch = Watch()
    n, rounds = 6, 1500
    ctls = [_words() for _ in range(n)]
    waiters = [Waiter(c) for c in ctls]
    asked = [0] * n
    bad: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        for r in range(1, rounds + 1):
            asked[i] = r
            if not watch.wait(waiters[i], r, 5_000_000):
                bad.append(f"{i}:{r}")

    def server() -> None:
        while not stop.is_set():
            for i in range(n):
                if ctls[i][W_REP] < asked[i]:
                    ctls[i][W_REP] = asked[i]
            os.sched_yield()

    srv = threading.Thread(target=server)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the GIL changes hands between nearly any two bytecodes
    try:
        srv.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        srv.join(timeout=10)
    assert bad == [] and not any(t.is_alive() for t in threads)
    assert watch.backstops == 0 and watch._waiting == [] and not watch._role.locked()


class _QueueJustTooLate(list[Waiter]):
    """A queue that, the first time the leaving spinner finds it empty, lets a thread queue
    behind its back before the spinner lets go of the role: the one interleaving the
    spinner's second look exists for."""

    def __init__(self, arrive: object) -> None:
        super().__init__()
        self.arrive = arrive

    def __len__(self) -> int:
        n = super().__len__()
        if n == 0 and self.arrive is not None:
            arrive, self.arrive = self.arrive, None
            arrive()  # type: ignore[operator]
        return n


def test_a_thread_that_queues_as_the_spinner_leaves_is_handed_the_role() -> None:
    watch = Watch()
    a, b = Waiter(_words()), Waiter(_words())
    got: dict[str, bool] = {}
    queued = threading.Event()

    def b_arrives() -> None:  # runs inside the spinner's emptiness check
        def waiter_b() -> None:
            got["b"] = watch.wait(b, 1, 500_000)
        threading.Thread(target=waiter_b).start()
        _until(lambda: list.__len__(watch._waiting) == 1)
        queued.set()

    a.ctl[W_REP] = 1  # a's reply is there at once: it leaves straight away
    watch._waiting = _QueueJustTooLate(b_arrives)
    assert watch.wait(a, 1, 5_000_000) is True
    assert queued.is_set()
    b.ctl[W_REP] = 1
    _until(lambda: "b" in got)
    assert got["b"] is True and watch.backstops == 0  # handed the role, not left to its backstop
