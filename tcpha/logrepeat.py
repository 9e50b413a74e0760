"""Rate-limiting repeated log lines: a burst of one kind of line per interval, then a count.

Under a flood (thousands of slow clients timing out, a back end refusing every handoff) one WARNING per
event would bury everything else and cost CPU in the daemon. ``RepeatFilter`` lets the first ``burst``
lines of a kind through per ``interval`` seconds and drops the rest; the first line of that kind after
the interval carries ``(N similar suppressed in the last S s)``, or, when none comes, a line of its own
(``N similar suppressed in the last S s (the last: ...)``) is logged when the interval ends (a timer
thread). A kind is the logger, the level and the message template (``record.msg`` before its arguments are filled in), or ``extra={"ratekey": ...}``
when one template covers several kinds (the status of an error answer). Records below ``level``
(default WARNING) always pass: per-connection INFO lines are asked for explicitly (dbglevel 4).

``flush()`` reports what is still pending at once (at stop).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any, Callable

__all__ = ["RepeatFilter", "install"]

DEFAULT_INTERVAL = 10.0
DEFAULT_BURST = 5
MAX_KINDS = 4096        # a bound on the table; beyond it the oldest kinds are forgotten


class RepeatFilter(logging.Filter):
    """A logging.Filter (attach it to a handler) that collapses repeats per kind per interval."""

    def __init__(self, interval: float = DEFAULT_INTERVAL, burst: int = DEFAULT_BURST,
                 level: int = logging.WARNING, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.burst = burst
        self.level = level
        self.clock = clock
        # kind -> [window start, lines let through, lines suppressed, last suppressed record]
        self.kinds: dict[tuple[Any, ...], list[Any]] = {}
        self.suppressed_total = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._timer_pid = 0
        # A worker forked while another thread held the lock must not inherit it held (as logging does).
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (f := ref()) is not None and f._after_fork())

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._timer = None

    @staticmethod
    def kind(record: logging.LogRecord) -> tuple[Any, ...]:
        return (record.name, record.levelno, getattr(record, "ratekey", None) or record.msg)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or getattr(record, "_repeat_checked", False):
            return True
        record._repeat_checked = True        # several handlers may share the filter: count a record once
        now = self.clock()
        key = self.kind(record)
        with self._lock:
            state = self.kinds.get(key)
            if state is None:
                if len(self.kinds) >= MAX_KINDS:
                    self.kinds.pop(next(iter(self.kinds)))
                self.kinds[key] = [now, 1, 0, None]
                return True
            start, passed, suppressed, _ = state
            if now - start >= self.interval:
                if suppressed:
                    record.msg = (f"{record.getMessage()} ({suppressed} similar suppressed in the last "
                                  f"{now - start:.0f} s)")
                    record.args = ()
                state[:] = [now, 1, 0, None]
                return True
            if passed < self.burst:
                state[1] = passed + 1
                return True
            state[2] = suppressed + 1
            state[3] = record
            self.suppressed_total += 1
            self._arm(start + self.interval - now)
        return False

    def _arm(self, delay: float) -> None:
        """Report the suppressed counts when their window ends, even if no line of their kind follows."""
        if self._timer is not None and self._timer_pid == os.getpid() and self._timer.is_alive():
            return
        self._timer = threading.Timer(max(0.05, delay), self._report_expired)
        self._timer.daemon = True
        self._timer_pid = os.getpid()
        self._timer.start()

    def _report_expired(self) -> None:
        now = self.clock()
        with self._lock:
            self._timer = None
            expired = [(key, s) for key, s in self.kinds.items() if s[2] and now - s[0] >= self.interval]
            for key, _ in expired:
                del self.kinds[key]
            waiting = [s[0] + self.interval - now for s in self.kinds.values() if s[2]]
            if waiting:
                self._arm(min(waiting))
        for key, state in expired:
            self._report(key, state, now - state[0])

    @staticmethod
    def _report(key: tuple[Any, ...], state: list[Any], seconds: float) -> None:
        name, levelno, _ = key
        last = state[3]
        example = last.getMessage() if last is not None else str(key[2])
        logging.getLogger(name).log(levelno, "%d similar suppressed in the last %.0f s (the last: %s)",
                                    state[2], seconds, example)

    def flush(self) -> None:
        """Report every pending suppressed count now (at stop), and reset the table."""
        now = self.clock()
        with self._lock:
            pending = [(key, s) for key, s in self.kinds.items() if s[2]]
            self.kinds.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for key, state in pending:
            self._report(key, state, now - state[0])


def install(handler: logging.Handler, **kw: Any) -> RepeatFilter:
    """Attach a RepeatFilter to `handler` (what tcpha.service.setup_logging does for the daemons)."""
    flt = RepeatFilter(**kw)
    handler.addFilter(flt)
    return flt
