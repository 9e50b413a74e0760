"""The states of a handoff, as a sans-I/O state machine (in the manner of h11's ``_state.py``).

No sockets, no event loop, no clock: the front end's Dispatch and the back end's control session feed
events in and act on what comes back; an event a state does not allow raises HandoffProtocolError.

The front end's view of one accepted connection (``FE_TRANSITIONS``)::

    PEEKING --HEAD_READ--> ROUTING                  request head / ClientHello read (or the TLS default)
    PEEKING --ANSWER--> ANSWERED                    400 / 408 / 414 written here
    PEEKING --CLOSE--> CLOSED                       the client went away
    ROUTING --PASS--> PASSED                        same host: the socket went to the local tcpha-be
    ROUTING --SERVE_LOCALLY--> LOCAL                relayed to the local node (redirectaddr)
    ROUTING --FREEZE--> FREEZING                    a back end on another host: freeze queued
    ROUTING --ANSWER--> ANSWERED                    503 or a TLS handshake_failure alert
    ROUTING --CLOSE--> CLOSED                       taking the connection back failed / writing failed
    FREEZING --FREEZE_FAILED--> ROUTING             next candidate
    FREEZING --NOT_SENT--> ROUTING                  link down, dump or send failed: next candidate
    FREEZING --HANDOFF_SENT--> HANDOFF_SENT         Handoff(xid) on a control link, xid pending
    HANDOFF_SENT --RESTORED--> FORWARDING           the back end rebuilt it: steering queued
    HANDOFF_SENT --REFUSED | TIMEOUT | LINK_LOST--> ROUTING   taken back (thaw): next candidate
    FORWARDING --FORWARD_FAILED--> ROUTING          the flow cannot be steered: taken back
    FORWARDING --STEERED--> STEERED                 flow steered, Steered(xid) sent: the back end owns it

STEERED, PASSED, LOCAL, ANSWERED and CLOSED are final. After Steered the connection is the back end's
and its Dispatch is over: what the front end keeps of the flow is a FlowRecord (tcpha/fe/ledger.py, with
the handoff's xid) until the back end's FlowClosed(xid) removes it (flow_closed_applies: a FlowClosed
of an earlier handoff on the same 4-tuple leaves a newer record alone). A handoff's id (xid) is unique
per front-end worker; the back end echoes it in Restored, Refused and FlowClosed, the front end in Steered.

The back end's view of one handoff (``BE_TRANSITIONS``)::

    NEW --RESTORED--> RESTORED              restored, application connected, Restored(xid) sent; the
                                            relay is held until the front end's Steered
    RESTORED --STEERED--> RELAYING          the client's packets come here now
    RESTORED --NOT_STEERED--> DROPPED       no Steered in time / control connection gone: the restored
                                            socket is closed silently (the front end kept the connection)
    RESTORED --FLOW_CLOSED--> ENDED_UNSTEERED   the relay ended before Steered (FlowClosed is sent)
    ENDED_UNSTEERED --STEERED--> CLOSED
    ENDED_UNSTEERED --NOT_STEERED--> DROPPED
    RELAYING --FLOW_CLOSED--> CLOSED        the relay ended: FlowClosed(xid) goes to the front end

NEW is where every id starts (one this session has not restored, or whose handoff is over: DROPPED and
CLOSED are final and forgotten); only the other states are kept per id.

Ids the other side never sent, or sent for a handoff already over (a Restored after the front end's
handofftimeout, a Steered after the back end gave up, a FlowClosed of an earlier connection on the
same 4-tuple), are not errors of this side: the views answer None / False and the caller logs or
ignores them, as the protocol says (docs/kernel.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar


class HandoffProtocolError(Exception):
    """An event the handoff's current state does not allow (a bug in the caller, not in the peer)."""

    def __init__(self, state: enum.Enum, event: enum.Enum, xid: int = 0):
        self.state = state
        self.event = event
        self.xid = xid
        what = f"handoff {xid}" if xid else "connection"
        super().__init__(f"{what}: event {event.name} not allowed in state {state.name}")


# -- the front end -------------------------------------------------------------------------------

class FeState(enum.Enum):
    # Members are singletons compared by identity: hash them so too (in C), not by Enum's Python-level
    # hash of the name: every step of every handoff looks its state and event up in FE_TRANSITIONS.
    __hash__ = object.__hash__
    PEEKING = "peeking"            # accepted; the request head / ClientHello is being peeked
    ROUTING = "routing"            # head read; between candidates
    FREEZING = "freezing"          # a back end on another host chosen; its freeze is queued
    HANDOFF_SENT = "handoff-sent"  # frozen, dumped, Handoff(xid) sent: waiting for Restored/Refused
    FORWARDING = "forwarding"      # Restored: steering the flow to the back end is queued
    STEERED = "steered"            # steered and Steered(xid) sent: the back end serves it (the ledger's
                                   # FlowRecord carries the flow until its FlowClosed)
    PASSED = "passed"              # same-host back end: the socket itself was passed
    LOCAL = "local"                # relayed to the local node by this worker
    ANSWERED = "answered"          # an error answer or a TLS alert was written here
    CLOSED = "closed"              # closed here without an answer


class FeEvent(enum.Enum):
    __hash__ = object.__hash__     # as FeState's
    HEAD_READ = enum.auto()
    PASS = enum.auto()
    SERVE_LOCALLY = enum.auto()
    FREEZE = enum.auto()
    FREEZE_FAILED = enum.auto()
    NOT_SENT = enum.auto()
    HANDOFF_SENT = enum.auto()
    RESTORED = enum.auto()
    REFUSED = enum.auto()
    TIMEOUT = enum.auto()
    LINK_LOST = enum.auto()
    FORWARD_FAILED = enum.auto()
    STEERED = enum.auto()
    ANSWER = enum.auto()
    CLOSE = enum.auto()


S, E = FeState, FeEvent
FE_TRANSITIONS: dict[FeState, dict[FeEvent, FeState]] = {
    S.PEEKING: {E.HEAD_READ: S.ROUTING, E.ANSWER: S.ANSWERED, E.CLOSE: S.CLOSED},
    S.ROUTING: {E.PASS: S.PASSED, E.SERVE_LOCALLY: S.LOCAL, E.FREEZE: S.FREEZING, E.ANSWER: S.ANSWERED,
                E.CLOSE: S.CLOSED},
    S.FREEZING: {E.FREEZE_FAILED: S.ROUTING, E.NOT_SENT: S.ROUTING, E.HANDOFF_SENT: S.HANDOFF_SENT},
    S.HANDOFF_SENT: {E.RESTORED: S.FORWARDING, E.REFUSED: S.ROUTING, E.TIMEOUT: S.ROUTING,
                     E.LINK_LOST: S.ROUTING},
    S.FORWARDING: {E.FORWARD_FAILED: S.ROUTING, E.STEERED: S.STEERED},
    S.STEERED: {},
    S.PASSED: {},
    S.LOCAL: {},
    S.ANSWERED: {},
    S.CLOSED: {},
}
del S, E

FE_FINAL = frozenset(s for s, events in FE_TRANSITIONS.items() if not events)
# The events that end a handoff still waiting for the back end's answer with the connection taken back.
FE_FAILURES = frozenset({FeEvent.REFUSED, FeEvent.TIMEOUT, FeEvent.LINK_LOST})

# What the connection table (`conn` control file) shows for a connection still being dispatched.
CONN_TABLE_STATE = {
    FeState.PEEKING: "reading", FeState.ROUTING: "reading", FeState.FREEZING: "reading",
    FeState.HANDOFF_SENT: "handing-off", FeState.FORWARDING: "handing-off",
}


class FeConnection:
    """The front end's state of one accepted connection, and the id of its latest handoff (0: none)."""

    __slots__ = ("state", "xid")

    def __init__(self) -> None:
        self.state = FeState.PEEKING
        self.xid = 0

    def handle(self, event: FeEvent) -> FeState:
        """Apply `event`; the new state. Raises HandoffProtocolError when the state does not allow it."""
        try:
            self.state = FE_TRANSITIONS[self.state][event]
        except KeyError:
            raise HandoffProtocolError(self.state, event, self.xid) from None
        return self.state

    @property
    def final(self) -> bool:
        return self.state in FE_FINAL

    @property
    def table_state(self) -> str:
        """The `conn` table's word for a connection being dispatched."""
        return CONN_TABLE_STATE.get(self.state, self.state.value)

    def __repr__(self) -> str:
        return f"<FeConnection {self.state.name} xid {self.xid}>"


T = TypeVar("T")
L = TypeVar("L", bound=Hashable)


@dataclass(slots=True)
class _Open(Generic[T, L]):
    conn: FeConnection
    link: L
    owner: T
    answered: bool = False        # Restored came (FORWARDING): no longer failed by a timeout or a lost link


class FrontEndHandoffs(Generic[T, L]):
    """The handoffs of one front-end worker: the xids it gives out, which ones wait for the back end's
    answer (Restored/Refused), and per control link the ones still open on it (until Steered is sent or
    the connection is taken back: a link closing gracefully waits for them).

    `owner` is the caller's object for the connection (the Dispatch), handed back when an answer for its
    xid comes; `link` any hashable (the ControlLink).
    """

    def __init__(self, first_xid: int = 0):
        self._last_xid = first_xid
        self._open: dict[int, _Open[T, L]] = {}
        self._by_link: dict[L, set[int]] = {}
        self._waiting = 0

    def new_xid(self) -> int:
        self._last_xid += 1
        return self._last_xid

    def sent(self, conn: FeConnection, xid: int, link: L, owner: T) -> None:
        """Handoff(xid) went out on `link` for `conn` (FREEZING -> HANDOFF_SENT)."""
        if xid in self._open:
            raise HandoffProtocolError(conn.state, FeEvent.HANDOFF_SENT, xid)
        conn.handle(FeEvent.HANDOFF_SENT)
        conn.xid = xid
        self._open[xid] = _Open(conn, link, owner)
        self._by_link.setdefault(link, set()).add(xid)
        self._waiting += 1

    def restored(self, xid: int) -> T | None:
        """The back end's Restored: the owner whose flow is to be steered now, or None when `xid` waits
        for no answer (unknown, or late: it timed out or was taken back, and the back end drops its copy
        when no Steered comes)."""
        entry = self._open.get(xid)
        if entry is None or entry.answered:
            return None
        entry.conn.handle(FeEvent.RESTORED)
        entry.answered = True
        self._waiting -= 1
        return entry.owner

    def failed(self, xid: int, event: FeEvent) -> T | None:
        """Refused, a timeout or the link lost (`event`) for `xid`: the owner to take its connection
        back, or None when `xid` waits for no answer (then nothing happens)."""
        if event not in FE_FAILURES:
            raise ValueError(f"{event.name} is not a failure of a handoff")
        entry = self._open.get(xid)
        if entry is None or entry.answered:
            return None
        entry.conn.handle(event)
        self._close(xid, entry)
        self._waiting -= 1
        return entry.owner

    def link_lost(self, link: L) -> list[T]:
        """`link` dropped: every handoff waiting on it fails (LINK_LOST), in the order they were sent;
        those already answered stay open until their owner ends them (no Steered can be sent now)."""
        failed = []
        for xid in sorted(self._by_link.get(link, ())):
            owner = self.failed(xid, FeEvent.LINK_LOST)
            if owner is not None:
                failed.append(owner)
        for xid in self._by_link.pop(link, set()):
            self._open.pop(xid, None)
        return failed

    def steered(self, conn: FeConnection) -> L | None:
        """The flow is steered to the back end (FORWARDING -> STEERED); the link the handoff was on, or
        None when that link was lost meanwhile."""
        conn.handle(FeEvent.STEERED)
        return self._end(conn)

    def forward_failed(self, conn: FeConnection) -> L | None:
        """Steering the flow failed: the connection is taken back (FORWARDING -> ROUTING)."""
        conn.handle(FeEvent.FORWARD_FAILED)
        return self._end(conn)

    def _end(self, conn: FeConnection) -> L | None:
        entry = self._open.get(conn.xid)
        if entry is None or entry.conn is not conn:
            return None
        self._close(conn.xid, entry)
        return entry.link

    def _close(self, xid: int, entry: _Open[T, L]) -> None:
        del self._open[xid]
        on_link = self._by_link.get(entry.link)
        if on_link is not None:
            on_link.discard(xid)
            if not on_link:
                del self._by_link[entry.link]

    def open_on(self, link: L) -> int:
        """Handoffs sent on `link` and not over yet (Steered not sent, connection not taken back)."""
        return len(self._by_link.get(link, ()))

    @property
    def waiting(self) -> int:
        """Handoffs waiting for the back end's answer."""
        return self._waiting

    def is_waiting(self, xid: int) -> bool:
        entry = self._open.get(xid)
        return entry is not None and not entry.answered


def flow_closed_applies(current_xid: int, reported_xid: int) -> bool:
    """A FlowClosed(reported_xid) ends the flow recorded under `current_xid` for its 4-tuple, unless both
    are known and differ: then it is stale (an earlier connection from the same client port) and the
    newer flow stays. An id of 0 (a back end or record without ids) always applies."""
    return not reported_xid or not current_xid or current_xid == reported_xid


# -- the back end --------------------------------------------------------------------------------

class BeState(enum.Enum):
    NEW = "new"                    # not restored here (the start of every id; never kept)
    RESTORED = "restored"          # socket rebuilt, Restored sent; waiting for Steered (relay held)
    ENDED_UNSTEERED = "ended-unsteered"   # its relay ended before Steered came
    RELAYING = "relaying"          # Steered: the client's packets come here, the relay runs
    DROPPED = "dropped"            # never steered here: closed silently, no FlowClosed
    CLOSED = "closed"              # the relay ended; FlowClosed goes to the front end


class BeEvent(enum.Enum):
    RESTORED = enum.auto()
    STEERED = enum.auto()
    NOT_STEERED = enum.auto()
    FLOW_CLOSED = enum.auto()


BE_TRANSITIONS: dict[BeState, dict[BeEvent, BeState]] = {
    BeState.NEW: {BeEvent.RESTORED: BeState.RESTORED},
    BeState.RESTORED: {BeEvent.STEERED: BeState.RELAYING, BeEvent.NOT_STEERED: BeState.DROPPED,
                       BeEvent.FLOW_CLOSED: BeState.ENDED_UNSTEERED},
    BeState.ENDED_UNSTEERED: {BeEvent.STEERED: BeState.CLOSED, BeEvent.NOT_STEERED: BeState.DROPPED},
    BeState.RELAYING: {BeEvent.FLOW_CLOSED: BeState.CLOSED},
    BeState.DROPPED: {},
    BeState.CLOSED: {},
}
_UNSTEERED = frozenset({BeState.RESTORED, BeState.ENDED_UNSTEERED})


class BackEndHandoffs(Generic[T]):
    """One control session's handoffs on the back end: restored and waiting for the front end's Steered
    (each with the caller's object: the relay and its timer), then relaying until the flow ends.

    Ids are the front end's, unique per control connection's worker: a Steered for an id not waiting
    (never restored here, or already given up) is ignored (None)."""

    def __init__(self) -> None:
        self._state: dict[int, BeState] = {}
        self._held: dict[int, T] = {}

    def restored(self, xid: int, held: T) -> None:
        """Restored(xid) sent (NEW -> RESTORED); `held` is what the caller gets back at Steered or when it
        gives up. An id already restored and not over raises HandoffProtocolError."""
        self._handle(xid, BeEvent.RESTORED)
        self._held[xid] = held

    def _handle(self, xid: int, event: BeEvent) -> BeState:
        state = self._state.get(xid, BeState.NEW)
        try:
            new = BE_TRANSITIONS[state][event]
        except KeyError:
            raise HandoffProtocolError(state, event, xid) from None
        if BE_TRANSITIONS[new]:
            self._state[xid] = new
        else:
            del self._state[xid]
        return new

    def steered(self, xid: int) -> T | None:
        """The front end's Steered: what was held for `xid` (now RELAYING, or CLOSED when its relay has
        ended already), None if `xid` waits for none."""
        if self._state.get(xid) not in _UNSTEERED:
            return None
        self._handle(xid, BeEvent.STEERED)
        return self._held.pop(xid)

    def not_steered(self, xid: int) -> T | None:
        """No Steered in time or the control connection gone: what was held (now DROPPED), None if
        `xid` waits for none (Steered came first)."""
        if self._state.get(xid) not in _UNSTEERED:
            return None
        self._handle(xid, BeEvent.NOT_STEERED)
        return self._held.pop(xid)

    def flow_closed(self, xid: int) -> BeState:
        """The relay of a handoff ended (and it was not dropped): FlowClosed(xid) is due. RELAYING ->
        CLOSED; before Steered RESTORED -> ENDED_UNSTEERED (what is held stays until Steered or giving up)."""
        if xid not in self._state:
            raise HandoffProtocolError(BeState.CLOSED, BeEvent.FLOW_CLOSED, xid)
        return self._handle(xid, BeEvent.FLOW_CLOSED)

    def state(self, xid: int) -> BeState | None:
        """RESTORED or RELAYING; None once the handoff is over (dropped, closed) or unknown."""
        return self._state.get(xid)

    def unsteered(self) -> list[int]:
        """The ids waiting for Steered, oldest first."""
        return [xid for xid, s in self._state.items() if s in _UNSTEERED]

    def __len__(self) -> int:
        return len(self._state)
