"""One spinner per process for the replies of all its shared-memory channels.

Why: a client waiting for its reply spins (`agent.serving.shm_client`), and while it spins
the server never has to ring it. But the spinners of one process share the GIL: sixteen
threads each looking at their own word hand the GIL round sixteen ways, and every handoff is
a thread woken through the GIL's condition variable, 6.4 of them per prediction measured at
16 clients (docs/inference-api.md, session 9), on whatever CPU the scheduler picks, the
agent's poller's as often as not. Here one waiting thread at a time (the spinner) looks at
the sequence words of every waiting channel of the process, and wakes the thread whose reply
came (a lock it sleeps on, without the GIL); the others sleep. The channel's own words do not
change: its CLIENT_PARKED flag stays clear while the process watches it, so the server writes
the reply and goes on, exactly as for a client spinning itself. Measured at 16 client threads
(docs/benchmarks.md, session 10): p99 4.6 -> 2.4 ms, but about a tenth less throughput (a
woken thread is scheduled later than a spinning one sees its reply) and 1-2 µs more per call
for a thread alone, so clients join it only when asked (`InferenceClient(shm_one_spinner=True)`).

A waiter whose spin time is up is told to park (it then sleeps in `recv` as before); the
spinner whose own reply came, or whose spin time is up, hands the role to the next waiter
still inside its spin time, so the role never lapses while anybody waits. Every decision about
a waiter is made under the watch's lock and the thread told is woken under it, so a waiter
whose backstop timeout fires can always tell whether it was told something; a thread alone
takes and gives back the role without that lock (see `Watch.wait`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from agent.serving.shm_layout import W_REP

#: What a waiter is told.
WAITING, DONE, SPIN, PARK = 0, 1, 2, 3
#: How much longer than its spin time a waiter sleeps before it looks for itself (a spinner
#: that never hands over: only a bug, or an exception in the spinner thread, would do that).
BACKSTOP_S = 0.05


class Waiter:
    """One thread waiting for reply `seq`: the REP word of its channel's control page `ctl`."""

    __slots__ = ("_wake", "ctl", "deadline", "seq", "told")

    def __init__(self, ctl: memoryview) -> None:
        self.ctl = ctl
        self.seq, self.deadline, self.told = 0, 0, WAITING
        self._wake = threading.Lock()
        self._wake.acquire()  # held while nobody is to be woken

    def tell(self, what: int) -> None:  # under the watch's lock
        self.told = what
        self._wake.release()

    def sleep(self, timeout_s: float) -> bool:
        """Sleep until told (True) or `timeout_s` passes (False); the GIL is let go meanwhile."""
        return self._wake.acquire(timeout=timeout_s)


class Watch:
    """The waiters of one process and which of them spins for all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # decisions about waiters: who is told what
        self._role = threading.Lock()  # held while somebody spins for the process
        self._waiting: list[Waiter] = []
        self._spinner: Waiter | None = None  # who spins now (for reading; the role is `_role`)
        self.backstops = 0  # waiters that woke by their backstop timeout (none, unless a bug)

    def wait(self, me: Waiter, seq: int, spin_us: float) -> bool:
        """Wait for reply `seq` for at most `spin_us`: True when it came, False when the spin
        time is up (the caller then parks on its socket, after one more look).

        A thread alone takes the role and gives it back without the watch's lock (two lock
        round trips cost it 1-2 µs a request): it queues only under the lock, and only while
        the role is held, and a spinner leaving an empty queue looks again after letting go.
        """
        clock = time.perf_counter_ns
        me.seq, me.deadline, me.told = seq, clock() + int(spin_us * 1000), WAITING
        if not self._role.acquire(False):
            with self._lock:
                queued = not self._role.acquire(False)  # not: the spinner left meanwhile
                if queued:
                    self._waiting.append(me)
            if queued:
                try:
                    told = me.sleep(spin_us / 1e6 + BACKSTOP_S)
                except BaseException:  # KeyboardInterrupt in the main thread: leave the watch
                    self._leave(me)
                    raise
                if not told and self._leave(me):  # nobody told it anything: look for itself
                    self.backstops += 1
                    return bool(me.ctl[W_REP] == seq)
                if me.told != SPIN:  # SPIN: the role was handed to this thread
                    return me.told == DONE
        self._spinner = me
        return self._spin(me, clock)

    def _leave(self, me: Waiter) -> bool:
        """Take `me` out of the watch; True when nobody had told it anything yet."""
        with self._lock:
            if me in self._waiting:
                self._waiting.remove(me)
                return True
            me.sleep(0)  # told already: its lock was released under this lock, take it back
            if me.told == SPIN:  # the role came to a thread that is leaving: pass it on
                me.told = WAITING
                self._hand_over_locked(time.perf_counter_ns())
            return False

    def _spin(self, me: Waiter, clock: Callable[[], int]) -> bool:
        """Look at every waiting channel until this thread's reply comes or its time is up."""
        got = False
        ctl, seq, deadline = me.ctl, me.seq, me.deadline
        waiting, yield_cpu = self._waiting, os.sched_yield
        try:
            while True:
                if ctl[W_REP] == seq:
                    got = True
                    break
                now = clock()
                if now > deadline:
                    break
                for w in waiting:  # read without the lock: the words are only read here
                    if w.ctl[W_REP] == w.seq or now > w.deadline:
                        self._tell_ready(now)
                        break
                yield_cpu()
        finally:
            self._hand_over(clock())
        return got

    def _tell_ready(self, now: int) -> None:
        with self._lock:
            keep = []
            for w in self._waiting:
                if w.ctl[W_REP] == w.seq:
                    w.tell(DONE)
                elif now > w.deadline:
                    w.tell(PARK)
                else:
                    keep.append(w)
            self._waiting[:] = keep

    def _hand_over(self, now: int) -> None:
        if not self._waiting:  # nobody queued: let go of the role, then look again
            self._spinner = None
            self._role.release()
            if not self._waiting or not self._role.acquire(False):
                return  # nobody, or a newer spinner has them
        with self._lock:
            self._hand_over_locked(now)

    def _hand_over_locked(self, now: int) -> None:
        """The spinner leaves: the first waiter still inside its spin time spins next."""
        waiting, nxt = self._waiting, None
        while waiting and nxt is None:
            w = waiting.pop(0)
            if w.ctl[W_REP] == w.seq:
                w.tell(DONE)
            elif now > w.deadline:
                w.tell(PARK)
            else:
                nxt = w
        self._spinner = nxt
        if nxt is not None:
            nxt.tell(SPIN)  # the role passes to it (still held)
        else:
            self._role.release()

    def reset(self) -> None:
        """A forked child starts with nobody waiting (its parent's threads are not in it)."""
        self._lock = threading.Lock()
        self._role = threading.Lock()
        self._waiting = []
        self._spinner = None


WATCH = Watch()
os.register_at_fork(after_in_child=WATCH.reset)
