"""The front-end worker's handoff deadlines (tcpha.fe.worker.Worker.handoff_deadline): one timer for the
oldest handoff still waiting instead of one per handoff; each handoff still fails at its own deadline.
No lab: the worker's two methods run on a stand-in with a clock the test moves."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

from tcpha.control.handoff import FeEvent
from tcpha.fe.worker import Worker


class Clock:
    """time() / call_at() of an event loop, the timers run by hand (advance)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[list] = []        # [when, callback, cancelled]

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback):
        timer = [when, callback, False]
        self.timers.append(timer)
        return SimpleNamespace(cancel=lambda: timer.__setitem__(2, True))

    def advance(self, to: float) -> None:
        self.now = to
        while True:
            due = [t for t in self.timers if not t[2] and t[0] <= to]
            if not due:
                return
            timer = min(due, key=lambda t: t[0])
            timer[2] = True
            timer[1]()

    def armed(self) -> int:
        return sum(1 for t in self.timers if not t[2])


def stand_in(timeout: float) -> SimpleNamespace:
    waiting: set[int] = set()
    failed: list[tuple[int, float]] = []
    w = SimpleNamespace(loop=Clock(), handofftimeout=timeout, handoffs=SimpleNamespace(is_waiting=waiting.__contains__),
                        _deadlines=deque(), _deadline_timer=None, _deadline_at=0.0, waiting=waiting, failed=failed)
    w._expire_handoffs = lambda: Worker._expire_handoffs(w)
    w.handoff_deadline = lambda xid: Worker.handoff_deadline(w, xid)

    def fail_handoff(xid: int, reason: str, event: FeEvent) -> None:
        assert reason == "timed out" and event is FeEvent.TIMEOUT
        waiting.discard(xid)
        failed.append((xid, w.loop.now))
    w.fail_handoff = fail_handoff
    return w


def send(w: SimpleNamespace, xid: int) -> None:
    w.waiting.add(xid)
    w.handoff_deadline(xid)


def test_only_unanswered_handoffs_time_out_each_at_its_deadline_with_one_timer():
    w = stand_in(2.0)
    for xid, at in ((1, 0.0), (2, 0.5), (3, 1.0)):
        w.loop.now = at
        send(w, xid)
    assert w.loop.armed() == 1                       # one timer, not one per handoff
    w.waiting.discard(1)                             # answered (Restored)
    w.loop.advance(2.4)
    assert w.failed == []                            # 1 was answered; 2 is due at 2.5
    w.loop.advance(2.5)
    assert w.failed == [(2, 2.5)]
    w.waiting.discard(3)
    w.loop.advance(10.0)
    assert w.failed == [(2, 2.5)]
    assert not w._deadlines and w.loop.armed() == 0  # nothing kept once all are over


def test_a_lowered_handofftimeout_fails_a_later_handoff_at_its_own_earlier_deadline():
    """A reload may lower handofftimeout: a handoff sent after it must not wait behind the older, longer
    deadlines of the queue."""
    w = stand_in(5.0)
    send(w, 1)                                        # due at 5.0
    w.loop.now = 1.0
    w.handofftimeout = 1.0
    send(w, 2)                                        # due at 2.0
    w.loop.advance(2.0)
    assert w.failed == [(2, 2.0)]
    w.loop.advance(5.0)
    assert w.failed == [(2, 2.0), (1, 5.0)]
