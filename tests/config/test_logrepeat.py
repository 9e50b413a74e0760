"""tcpha.logrepeat.RepeatFilter: a burst of each kind of warning per interval, then a count of the rest."""

from __future__ import annotations

import logging

from tcpha.logrepeat import RepeatFilter
from tests.support import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self, flt: RepeatFilter) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.addFilter(flt)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logger(name: str, flt: RepeatFilter) -> tuple[logging.Logger, Collect]:
    handler = Collect(flt)
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, handler


def test_repeats_collapse_per_kind_and_the_next_line_counts_them():
    clock = Clock()
    flt = RepeatFilter(interval=10, burst=3, clock=clock)
    log, out = _logger("tcpha.test.repeat1", flt)
    for i in range(1000):
        log.warning("%s:%d: %d: %s", "10.0.0.2", 1000 + i, 408, "slow", extra={"ratekey": ("answer", 408)})
    log.warning("%s:%d: %d: %s", "10.0.0.2", 7, 400, "bad", extra={"ratekey": ("answer", 400)})  # another kind
    for i in range(50):
        log.info("per-connection line %d", i)                     # below WARNING: never limited
    assert len(out.lines) == 3 + 1 + 50
    assert out.lines[3] == "10.0.0.2:7: 400: bad"
    assert flt.suppressed_total == 997
    clock.now += 10
    log.warning("%s:%d: %d: %s", "10.0.0.2", 9, 408, "slow", extra={"ratekey": ("answer", 408)})
    assert out.lines[-1] == "10.0.0.2:9: 408: slow (997 similar suppressed in the last 10 s)"
    log.warning("%s:%d: %d: %s", "10.0.0.2", 10, 408, "slow", extra={"ratekey": ("answer", 408)})
    assert out.lines[-1] == "10.0.0.2:10: 408: slow"               # a new window: no count again


def test_a_count_with_no_later_line_of_its_kind_is_reported_when_its_interval_ends():
    flt = RepeatFilter(interval=0.2, burst=2)
    log, out = _logger("tcpha.test.repeat2", flt)
    for i in range(10):
        log.warning("client %d timed out", i)
    assert out.lines == ["client 0 timed out", "client 1 timed out"]
    wait_until(lambda: len(out.lines) == 3, timeout=10, what="the suppressed count's own line")
    assert out.lines[2] == "8 similar suppressed in the last 0 s (the last: client 9 timed out)"


def test_flush_reports_pending_counts_at_once():
    clock = Clock()
    flt = RepeatFilter(interval=3600, burst=1, clock=clock)
    log, out = _logger("tcpha.test.repeat3", flt)
    for i in range(4):
        log.error("link %d lost", i)
    flt.flush()
    assert out.lines == ["link 0 lost", "3 similar suppressed in the last 0 s (the last: link 3 lost)"]
