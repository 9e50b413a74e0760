"""tcpha-fe, with one fault put in for tests/e2e/test_freeze_recovery.py: bytes that reach the front
end's socket after its dump.

Under load a segment can pass the freeze just before it takes effect and land on the dumped socket, which
acknowledges it to the client (repair mode does not stop reception: tests/kernel/test_repair_state.py).
That race cannot be made to happen on demand from outside, so here the first handoff of each connection
to LATE_PATH gets it for sure: its flow is thawed as soon as it is frozen, the socket is dumped and the
Handoff sent as usual, a line is logged (`test fault: IP:PORT dumped and thawed`: the test's client
sends the rest of its request on reading it), and the worker waits until those bytes have reached the
socket. Everything after that is the front end's own code.

Run as `python tests/e2e/late_bytes_fe.py -c tcphafe.conf` (the workers are forked from this process,
so they run the patched method).
"""

from __future__ import annotations

import logging
import sys
import time

from tcpha import repair
from tcpha.cli.fe import main
from tcpha.fe.dispatch import Dispatch

LATE_PATH = b"/upload-late"
WAIT = 10.0                       # for the client's next bytes

log = logging.getLogger("tcpha.fe.dispatch")
_frozen = Dispatch.frozen
_done: set[tuple[str, int]] = set()


def frozen_with_late_bytes(self: Dispatch, error: Exception | None) -> None:
    facts = self.facts
    if error is not None or facts is None or facts.uri != LATE_PATH or self.peer in _done:
        _frozen(self, error)
        return
    _done.add(self.peer)
    self.worker.batch.thaw(self.flow)         # the freeze lets the client's next segment through
    _frozen(self, error)                      # dump, Handoff
    if self.dumped is None:
        return
    # the test's client sends the rest of its request when it reads this line
    log.warning("test fault: %s:%d dumped and thawed", self.peer[0], self.peer[1])
    deadline = time.monotonic() + WAIT
    while repair.received_since(self.sock, self.dumped) == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    log.warning("test fault: %d bytes let through to %s:%d after its dump",
                repair.received_since(self.sock, self.dumped), self.peer[0], self.peer[1])


Dispatch.frozen = frozen_with_late_bytes      # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
