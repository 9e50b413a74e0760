"""The arbiter's signal dispatch (tcpha.fe.arbiter), without root and without forking workers.

Real signals are sent to this process after FrontEnd.install_signal_handlers; one `tick` of the main
loop then runs the handlers. Spawning and reaping are replaced by recorders (a real waitpid(-1) here
would reap pytest's own children), so no worker is ever forked.
"""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

from tcpha.fe import arbiter
from tcpha.fe.arbiter import SIG_NAMES, SIGNALS, FrontEnd


class FakeRuntime:
    """What the arbiter's loop uses of tcpha.fe.runtime.FrontEndRuntime."""

    def __init__(self) -> None:
        self.reloads = 0
        self.pool_asks = 0
        self.answers: dict[int, int] = {}     # pid -> connections being dispatched, of the workers that answered
        self.linked: set[int] = set()         # the workers whose runtime link is attached

    def reload(self) -> None:
        self.reloads += 1

    def busy_per_worker(self) -> dict[int, int]:
        self.pool_asks += 1
        return dict(self.answers)

    def linked_workers(self) -> set[int]:
        return set(self.linked)


@pytest.fixture
def front_end(monkeypatch):
    """A FrontEnd whose signal handlers are installed in this process, with a fake runtime and
    recorders for spawning and reaping; the previous handlers and wakeup fd are restored after."""
    config = SimpleNamespace(startservers=2, minspareservers=0, maxspareservers=5, grace=0,
                             steering="auto", tunnel="none", rehandoff="off")
    fe = FrontEnd(config)
    fe.runtime = FakeRuntime()
    fe.spawned = []
    fe.exited = []              # what the next _reap returns: (pid, number, status)
    monkeypatch.setattr(fe, "_spawn", lambda number: fe.spawned.append(number))

    def reap() -> list[tuple[int, int, str]]:
        out, fe.exited = fe.exited, []
        return out
    monkeypatch.setattr(fe, "_reap", reap)
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    old_wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(old_wakeup)
    try:
        yield fe
    finally:
        wakeup_w = signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for fd in (fe._wakeup_r, wakeup_w):
            if fd >= 0 and fd != old_wakeup:
                os.close(fd)


def record_handlers(fe: FrontEnd) -> list[str]:
    """Wrap every handle_<name> of the signals so that the names reached are recorded in order."""
    reached: list[str] = []
    for name in SIG_NAMES.values():
        real = getattr(fe, f"handle_{name}")

        def wrapper(name: str = name, real=real) -> None:
            reached.append(name)
            real()
        setattr(fe, f"handle_{name}", wrapper)
    return reached


def test_sig_names_name_one_handler_per_signal():
    assert SIG_NAMES == {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup",
                         signal.SIGCHLD: "chld"}
    handlers = {name[len("handle_"):] for name in dir(FrontEnd)
                if name.startswith("handle_") and name != "handle_signals"}
    assert handlers == set(SIG_NAMES.values())


@pytest.mark.parametrize("sig, name", [(signal.SIGHUP, "hup"), (signal.SIGTERM, "term"),
                                       (signal.SIGINT, "int"), (signal.SIGCHLD, "chld")])
def test_each_signal_reaches_its_handler(front_end, sig, name):
    reached = record_handlers(front_end)
    front_end.install_signal_handlers()
    os.kill(os.getpid(), sig)
    front_end.tick()
    assert reached == [name]
    assert front_end.sig_queue == []


def test_hup_reloads_and_keeps_running(front_end):
    front_end.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGHUP)
    front_end.tick()
    assert front_end.runtime.reloads == 1
    assert not front_end.stopping


def test_hup_without_runtime_changes_nothing(front_end, caplog):
    front_end.runtime = None
    front_end.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGHUP)
    front_end.tick()
    assert not front_end.stopping
    assert "configuration unchanged" in caplog.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_and_nothing_after_it(front_end, sig):
    """A stop queued with a reload and a dead worker in the same tick: the stop only (the order of
    SIGNALS), no reload, no replacement; the pool is not resized either."""
    reached = record_handlers(front_end)
    front_end.install_signal_handlers()
    front_end.exited = [(4242, 1, "signal SIGKILL")]
    for s in (signal.SIGCHLD, signal.SIGHUP, sig):
        os.kill(os.getpid(), s)
    front_end.tick()
    assert reached == [SIG_NAMES[sig]]
    assert front_end.stopping
    assert front_end.runtime.reloads == 0
    assert front_end.spawned == []
    assert front_end.runtime.pool_asks == 0


def test_a_signal_repeated_within_a_tick_is_handled_once(front_end):
    front_end.install_signal_handlers()
    front_end.queue_signal(signal.SIGHUP, None)
    os.kill(os.getpid(), signal.SIGHUP)
    front_end.tick()
    assert front_end.runtime.reloads == 1


def test_chld_replaces_a_dead_worker_but_not_a_retired_one(front_end):
    front_end.install_signal_handlers()
    front_end._retiring.add(5151)
    front_end.exited = [(4242, 3, "signal SIGKILL"), (5151, 4, "status 0")]
    os.kill(os.getpid(), signal.SIGCHLD)
    front_end.tick()
    assert front_end.spawned == [3]
    assert front_end._retiring == set()
    assert not front_end.stopping


def test_after_a_handover_exits_are_not_replaced_and_the_loop_ends(front_end):
    front_end.install_signal_handlers()
    front_end.handed_over = True
    front_end.exited = [(4242, 0, "status 0")]
    os.kill(os.getpid(), signal.SIGCHLD)
    front_end.tick()
    assert front_end.spawned == []
    assert front_end.stopping


def test_quiet_tick_resizes_the_pool(front_end, monkeypatch):
    """No signal within the tick's second: the pool is asked (not when a signal waits)."""
    monkeypatch.setattr(arbiter.select, "select", lambda r, w, x, timeout: ([], [], []))
    front_end.install_signal_handlers()
    front_end.tick()
    assert front_end.runtime.pool_asks == 1
    assert not front_end.stopping


def test_sigterm_ends_the_main_loop(front_end):
    """_run_arbiter: workers started, READY sent, then a SIGTERM (sent once the last worker is
    started) ends the loop and stops the (here: no) workers."""
    states: list[str] = []
    front_end.notify = states.append

    def spawn(number: int) -> None:
        front_end.spawned.append(number)
        if number == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    front_end._spawn = spawn
    front_end.install_signal_handlers()         # FrontEnd.run does it first thing, before the kernel state
    front_end._run_arbiter()
    assert front_end.spawned == [0, 1]
    assert states == ["READY=1"]
    assert front_end.stopping


@pytest.mark.parametrize("answers,linked,spawned", [
    ({}, set(), []),                   # both just started, not linked yet: idle, as Apache counts starting children
    ({101: 0}, {101}, []),             # one answered idle, one not linked yet: two idle
    ({101: 0}, {101, 102}, []),        # one idle, one linked but silent (busy machine): no decision
    ({101: 3}, {101, 102}, []),        # ... not even when the other is busy
    ({101: 3, 102: 1}, {101, 102}, [2]),   # both busy: a spare is started
    ({101: 0, 102: 1}, {101, 102}, [2]),   # one idle (< minspareservers 2)
])
def test_pool_counts_a_worker_not_yet_linked_as_idle(front_end, answers, linked, spawned):
    """The first tick may come before the workers' links are attached: no spare is started for workers
    that are only starting; while a linked worker does not answer in time the pool is left as it is."""
    front_end.config.minspareservers = 2
    front_end.workers = {101: 0, 102: 1}
    front_end.runtime.answers = answers
    front_end.runtime.linked = linked
    front_end._adjust_pool()
    assert front_end.spawned == spawned
