"""The embedded session store of dc_server.

Semantics are the original C server's (see distcache-protocol.md, "Server
cache semantics"):

* entries are ordered by absolute expiry (server time + timeout); equal
  expiries keep insertion order;
* expiry is lazy and strict: before every operation, entries with
  ``now > expiry`` are dropped (an entry is still valid at its exact expiry);
* ADD of an id already present (after expiring) answers 101 and keeps the old
  entry;
* ADD into a full store first evicts the ``max(1, sessions // 30)`` entries
  closest to expiry (not LRU), then inserts;
* GET neither refreshes nor reorders.

Unlike the C server (linear scans), every operation is O(1) or O(log n):

* ``_index`` maps session id -> entry, an entry being the tuple
  ``(order_key, session_id, data)``;
* ``_heap`` is a binary heap of the *same* tuple objects, keyed by
  ``order_key = expiry_ms << 40 | insertion_counter`` (one int, unique, so the
  heap never compares ids and ties are broken by insertion order).

REMOVE only drops the id from ``_index``; its heap tuple becomes stale (it is
recognised because ``_index.get(id) is not entry``) and is skipped when it
reaches the top, or dropped by a rebuild once stale tuples outnumber live ones.
Memory per session: one dict slot, one 3-tuple shared by dict and heap, one int,
one heap slot (about 250 bytes beyond the id and data bytes objects, measured by
bench/distcache/run.py).

Time is wall-clock milliseconds (``time.time()``), like the original's
gettimeofday(), so that persisted expiries stay absolute across restarts.
"""

from __future__ import annotations

import heapq
import time
from typing import Callable, Iterator

from .codec import Status

__all__ = ["SessionStore", "DEFAULT_SESSIONS", "SEQ_BITS", "wall_ms"]

DEFAULT_SESSIONS = 512
_SEQ_BITS = SEQ_BITS = 40
_SEQ_MASK = (1 << _SEQ_BITS) - 1


def wall_ms() -> int:
    return int(time.time() * 1000)


class SessionStore:
    """In-memory session cache; see the module docstring for the rules."""

    is_async = False
    __slots__ = ("max_sessions", "_index", "_heap", "_seq", "_stale", "_clock",
                 "on_evict", "expired", "evicted")

    def __init__(self, max_sessions: int = DEFAULT_SESSIONS,
                 clock: Callable[[], int] = wall_ms) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self._index: dict[bytes, tuple[int, bytes, bytes]] = {}
        self._heap: list[tuple[int, bytes, bytes]] = []
        self._seq = 0
        self._stale = 0
        self._clock = clock
        # Called with the list of ids evicted to make room (persistence logs them).
        self.on_evict: Callable[[list[bytes]], None] | None = None
        self.expired = 0
        self.evicted = 0

    # -- the rules -----------------------------------------------------------

    def expire(self, now: int | None = None) -> None:
        """Drop every entry with now > expiry (rule: strict lazy expiry)."""
        heap = self._heap
        if not heap:
            return
        if now is None:
            now = self._clock()
        # order_key < (now << 40)  <=>  expiry < now  (strict: expiry == now stays)
        limit = now << _SEQ_BITS
        if heap[0][0] >= limit:
            return
        index = self._index
        pop = heapq.heappop
        while heap and heap[0][0] < limit:
            entry = pop(heap)
            if index.get(entry[1]) is entry:
                del index[entry[1]]
                self.expired += 1
            else:
                self._stale -= 1

    def _evict(self, count: int) -> None:
        """Rule: evict the entries closest to expiry (heap order), skipping stale tuples."""
        heap = self._heap
        index = self._index
        pop = heapq.heappop
        gone: list[bytes] = []
        while count > 0 and heap:
            entry = pop(heap)
            if index.get(entry[1]) is entry:
                del index[entry[1]]
                gone.append(entry[1])
                count -= 1
            else:
                self._stale -= 1
        self.evicted += len(gone)
        if gone and self.on_evict is not None:
            self.on_evict(gone)

    def _insert(self, session_id: bytes, data: bytes, expiry_ms: int) -> None:
        if len(self._index) >= self.max_sessions:
            # Rule: when full, evict max(1, sessions/30) entries closest to expiry.
            self._evict(max(1, self.max_sessions // 30))
        self._seq += 1
        entry = ((expiry_ms << _SEQ_BITS) | (self._seq & _SEQ_MASK), session_id, data)
        self._index[session_id] = entry
        heapq.heappush(self._heap, entry)

    # -- the interface ---------------------------------------------------------

    def add(self, session_id: bytes, data: bytes, timeout_ms: int) -> Status:
        """Store a session for timeout_ms from now: OK, or ADD_MATCHING_SESSION (101)
        when the id is present (the old entry stays).  Range checks are the server's."""
        now = self._clock()
        self.expire(now)
        if session_id in self._index:
            return Status.ADD_MATCHING_SESSION
        self._insert(session_id, data, now + timeout_ms)
        return Status.OK

    def add_absolute(self, session_id: bytes, data: bytes, expiry_ms: int) -> Status:
        """ADD with an absolute wall-clock expiry (used when reloading a persisted file)."""
        now = self._clock()
        self.expire(now)
        if expiry_ms < now:
            return Status.NOTOK
        if session_id in self._index:
            return Status.ADD_MATCHING_SESSION
        self._insert(session_id, data, expiry_ms)
        return Status.OK

    def get(self, session_id: bytes) -> bytes | None:
        heap = self._heap
        if heap and heap[0][0] < (self._clock() << _SEQ_BITS):   # inlined expire() test
            self.expire()
        entry = self._index.get(session_id)
        return None if entry is None else entry[2]

    def remove(self, session_id: bytes) -> bool:
        heap = self._heap
        if heap and heap[0][0] < (self._clock() << _SEQ_BITS):
            self.expire()
        entry = self._index.pop(session_id, None)
        if entry is None:
            return False
        self._stale += 1
        if self._stale > 1024 and self._stale > len(self._index):
            self._compact_heap()
        return True

    def has(self, session_id: bytes) -> bool:
        heap = self._heap
        if heap and heap[0][0] < (self._clock() << _SEQ_BITS):
            self.expire()
        return session_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    # -- helpers -----------------------------------------------------------------

    def expiry_of(self, session_id: bytes) -> int | None:
        """Absolute wall-clock expiry (ms) of a stored session, None if absent."""
        entry = self._index.get(session_id)
        return None if entry is None else entry[0] >> _SEQ_BITS

    def entries(self) -> Iterator[tuple[int, bytes, bytes]]:
        """(expiry_ms, session_id, data) of every stored session, in insertion order."""
        for key, sid, data in list(self._index.values()):
            yield key >> _SEQ_BITS, sid, data

    def snapshot(self) -> list[tuple[int, bytes, bytes]]:
        """A cheap copy of the entries for another thread: (order_key, id, data) tuples, where
        ``order_key >> SEQ_BITS`` is the expiry in ms (the tuples are immutable, so sharing is safe)."""
        return list(self._index.values())

    def _compact_heap(self) -> None:
        index = self._index
        self._heap = [e for e in self._heap if index.get(e[1]) is e]
        heapq.heapify(self._heap)
        self._stale = 0

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self._index), "max_sessions": self.max_sessions,
                "expired": self.expired, "evicted": self.evicted,
                "heap": len(self._heap)}
