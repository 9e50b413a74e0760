"""The handoff state machine (tcpha.control.handoff) without root, sockets or an event loop: every
transition of both sides' tables, legal and illegal, and the id bookkeeping of the front end (per
link, per answer) and of the back end (restored, steered, closed)."""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from tcpha.control.handoff import (BE_TRANSITIONS, FE_FINAL, FE_TRANSITIONS, BackEndHandoffs, BeEvent, BeState,
                                   FeConnection, FeEvent, FeState, FrontEndHandoffs, HandoffProtocolError,
                                   flow_closed_applies)


def _paths() -> dict[FeState, list[FeEvent]]:
    """For each front-end state, the shortest list of events leading there from PEEKING."""
    paths = {FeState.PEEKING: []}
    todo = deque([FeState.PEEKING])
    while todo:
        state = todo.popleft()
        for event, nxt in FE_TRANSITIONS[state].items():
            if nxt not in paths:
                paths[nxt] = paths[state] + [event]
                todo.append(nxt)
    return paths


PATHS = _paths()


def _conn_in(state: FeState) -> FeConnection:
    conn = FeConnection()
    for event in PATHS[state]:
        conn.handle(event)
    assert conn.state is state
    return conn


def test_every_front_end_state_is_reachable_and_the_table_is_complete():
    assert set(PATHS) == set(FeState) == set(FE_TRANSITIONS)
    assert FE_FINAL == {FeState.STEERED, FeState.PASSED, FeState.LOCAL, FeState.ANSWERED, FeState.CLOSED}


LEGAL_FE = [(s, e, n) for s, events in FE_TRANSITIONS.items() for e, n in events.items()]
ILLEGAL_FE = [(s, e) for s, e in itertools.product(FeState, FeEvent) if e not in FE_TRANSITIONS[s]]


@pytest.mark.parametrize("state,event,new", LEGAL_FE, ids=[f"{s.name}-{e.name}" for s, e, _ in LEGAL_FE])
def test_front_end_legal_transition(state, event, new):
    conn = _conn_in(state)
    assert conn.handle(event) is new and conn.state is new


@pytest.mark.parametrize("state,event", ILLEGAL_FE, ids=[f"{s.name}-{e.name}" for s, e in ILLEGAL_FE])
def test_front_end_illegal_transition_raises(state, event):
    conn = _conn_in(state)
    conn.xid = 7
    with pytest.raises(HandoffProtocolError, match=f"handoff 7: event {event.name} not allowed in state "
                       f"{state.name}") as info:
        conn.handle(event)
    assert (info.value.state, info.value.event, info.value.xid) == (state, event, 7)
    assert conn.state is state                      # an illegal event changes nothing


def test_the_tables_as_documented():
    """The spots the I/O code relies on: a failed handoff goes back to choosing, never to a final state."""
    for event in (FeEvent.REFUSED, FeEvent.TIMEOUT, FeEvent.LINK_LOST):
        assert FE_TRANSITIONS[FeState.HANDOFF_SENT][event] is FeState.ROUTING
    assert FE_TRANSITIONS[FeState.FORWARDING] == {FeEvent.FORWARD_FAILED: FeState.ROUTING,
                                                  FeEvent.STEERED: FeState.STEERED}
    assert FeEvent.CLOSE not in FE_TRANSITIONS[FeState.HANDOFF_SENT]   # taken back first, then closed


def test_conn_table_words():
    words = {s: _conn_in(s).table_state for s in (FeState.PEEKING, FeState.ROUTING, FeState.FREEZING,
                                                  FeState.HANDOFF_SENT, FeState.FORWARDING)}
    assert words == {FeState.PEEKING: "reading", FeState.ROUTING: "reading", FeState.FREEZING: "reading",
                     FeState.HANDOFF_SENT: "handing-off", FeState.FORWARDING: "handing-off"}


# -- the front end's ids --------------------------------------------------------------------------

def _frozen() -> FeConnection:
    return _conn_in(FeState.FREEZING)


def _send(fe: FrontEndHandoffs, link: str, owner: str) -> tuple[FeConnection, int]:
    conn = _frozen()
    xid = fe.new_xid()
    fe.sent(conn, xid, link, owner)
    return conn, xid


def test_ids_are_unique_per_worker_and_start_above_the_base():
    fe = FrontEndHandoffs(5 << 32)
    assert [fe.new_xid() for _ in range(3)] == [(5 << 32) + 1, (5 << 32) + 2, (5 << 32) + 3]


def test_restored_then_steered_closes_the_handoff_on_its_link():
    fe: FrontEndHandoffs[str, str] = FrontEndHandoffs()
    conn, xid = _send(fe, "link0", "d1")
    assert conn.state is FeState.HANDOFF_SENT and conn.xid == xid
    assert (fe.waiting, fe.open_on("link0"), fe.is_waiting(xid)) == (1, 1, True)
    assert fe.restored(xid) == "d1" and conn.state is FeState.FORWARDING
    # Answered: no longer waiting, still open on its link (Steered not written yet: a close waits for it).
    assert (fe.waiting, fe.open_on("link0"), fe.is_waiting(xid)) == (0, 1, False)
    assert fe.steered(conn) == "link0" and conn.state is FeState.STEERED
    assert (fe.waiting, fe.open_on("link0")) == (0, 0)
    assert fe.restored(xid) is None                       # a second Restored for it: nothing
    assert conn.final                                     # the flow is the ledger's FlowRecord's now


def test_late_restored_after_timeout_is_ignored():
    fe: FrontEndHandoffs[str, str] = FrontEndHandoffs()
    conn, xid = _send(fe, "link0", "d1")
    assert fe.failed(xid, FeEvent.TIMEOUT) == "d1" and conn.state is FeState.ROUTING
    assert (fe.waiting, fe.open_on("link0")) == (0, 0)
    assert fe.restored(xid) is None                        # the back end drops its copy (no Steered)
    assert fe.failed(xid, FeEvent.REFUSED) is None         # nor does a late Refused do anything
    assert conn.state is FeState.ROUTING and conn.xid == xid
    # The same connection tries the next candidate under a new id; the old one stays unknown.
    conn.handle(FeEvent.FREEZE)
    xid2 = fe.new_xid()
    fe.sent(conn, xid2, "link1", "d1")
    assert xid2 != xid and fe.restored(xid) is None and fe.restored(xid2) == "d1"


def test_refused_then_next_candidate():
    fe: FrontEndHandoffs[str, str] = FrontEndHandoffs()
    conn, xid = _send(fe, "be1-link", "d1")
    assert fe.failed(xid, FeEvent.REFUSED) == "d1"
    assert conn.state is FeState.ROUTING and fe.open_on("be1-link") == 0
    conn.handle(FeEvent.FREEZE)                            # the next back end
    xid2 = fe.new_xid()
    fe.sent(conn, xid2, "be2-link", "d1")
    assert (fe.open_on("be1-link"), fe.open_on("be2-link"), conn.xid) == (0, 1, xid2)
    assert fe.restored(xid2) == "d1" and fe.steered(conn) == "be2-link"


def test_timeout_after_restored_does_nothing():
    """The timer is cancelled at Restored; should it still fire, the handoff is not failed twice."""
    fe: FrontEndHandoffs[str, str] = FrontEndHandoffs()
    conn, xid = _send(fe, "link0", "d1")
    fe.restored(xid)
    assert fe.failed(xid, FeEvent.TIMEOUT) is None and conn.state is FeState.FORWARDING


def test_link_lost_with_several_pending():
    fe: FrontEndHandoffs[str, str] = FrontEndHandoffs()
    c1, x1 = _send(fe, "link0", "d1")
    c2, x2 = _send(fe, "link0", "d2")
    c3, x3 = _send(fe, "link0", "d3")
    c4, x4 = _send(fe, "link1", "d4")                     # another link: untouched
    fe.restored(x3)                                        # answered: steering is under way
    assert (fe.waiting, fe.open_on("link0")) == (3, 3)
    assert fe.link_lost("link0") == ["d1", "d2"]           # in the order they were sent
    assert (c1.state, c2.state, c3.state, c4.state) == (FeState.ROUTING, FeState.ROUTING, FeState.FORWARDING,
                                                        FeState.HANDOFF_SENT)
    assert (fe.waiting, fe.open_on("link0"), fe.open_on("link1")) == (1, 0, 1)
    # The answered one ends later: no link to send its Steered on.
    assert fe.steered(c3) is None and c3.state is FeState.STEERED
    assert fe.restored(x1) is None and fe.link_lost("link0") == []
    assert fe.restored(x4) == "d4"


def test_forward_failed_takes_the_connection_back():
    fe: FrontEndHandoffs[str, str] = FrontEndHandoffs()
    conn, xid = _send(fe, "link0", "d1")
    fe.restored(xid)
    assert fe.forward_failed(conn) == "link0" and conn.state is FeState.ROUTING
    assert fe.open_on("link0") == 0


def test_front_end_registry_refuses_what_the_table_refuses():
    fe: FrontEndHandoffs[str, str] = FrontEndHandoffs()
    conn = _conn_in(FeState.ROUTING)                       # not frozen: no Handoff may be sent for it
    with pytest.raises(HandoffProtocolError):
        fe.sent(conn, fe.new_xid(), "link0", "d1")
    conn, xid = _send(fe, "link0", "d1")
    with pytest.raises(HandoffProtocolError):              # an id given twice
        fe.sent(_frozen(), xid, "link0", "d2")
    with pytest.raises(HandoffProtocolError):              # steered before Restored
        fe.steered(conn)
    with pytest.raises(ValueError):
        fe.failed(xid, FeEvent.STEERED)
    assert fe.waiting == 1 and conn.state is FeState.HANDOFF_SENT


@pytest.mark.parametrize("current,reported,applies", [
    (7, 7, True),          # this handoff's end
    (8, 7, False),         # stale: FlowClosed of an earlier connection from the same client port
    (0, 7, True),          # a record without an id (a local-node flow)
    (8, 0, True),          # a back end that sends no id
])
def test_stale_flow_closed(current, reported, applies):
    assert flow_closed_applies(current, reported) is applies


# -- the back end ---------------------------------------------------------------------------------

LEGAL_BE = [(s, e, n) for s, events in BE_TRANSITIONS.items() for e, n in events.items()]
ILLEGAL_BE = [(s, e) for s, e in itertools.product(BeState, BeEvent) if e not in BE_TRANSITIONS[s]]


def _be_in(state: BeState, xid: int = 9) -> BackEndHandoffs[str]:
    be: BackEndHandoffs[str] = BackEndHandoffs()
    if state is BeState.NEW:
        return be
    be.restored(xid, "relay")
    steps = {BeState.RESTORED: [], BeState.RELAYING: [be.steered], BeState.ENDED_UNSTEERED: [be.flow_closed],
             BeState.DROPPED: [be.not_steered], BeState.CLOSED: [be.steered, be.flow_closed]}[state]
    for step in steps:
        step(xid)
    return be


def test_every_back_end_state_is_in_the_table_and_new_is_its_only_start():
    assert set(BE_TRANSITIONS) == set(BeState)
    assert BE_TRANSITIONS[BeState.NEW] == {BeEvent.RESTORED: BeState.RESTORED}
    assert not any(BeState.NEW in events.values() for events in BE_TRANSITIONS.values())


@pytest.mark.parametrize("state,event,new", LEGAL_BE, ids=[f"{s.name}-{e.name}" for s, e, _ in LEGAL_BE])
def test_back_end_legal_transition(state, event, new):
    be = _be_in(state)
    if event is BeEvent.RESTORED:
        be.restored(9, "relay")
    elif event is BeEvent.STEERED:
        assert be.steered(9) == "relay"
    elif event is BeEvent.NOT_STEERED:
        assert be.not_steered(9) == "relay"
    else:
        assert be.flow_closed(9) is new
    assert be.state(9) is (new if BE_TRANSITIONS[new] else None)


@pytest.mark.parametrize("state,event", ILLEGAL_BE, ids=[f"{s.name}-{e.name}" for s, e in ILLEGAL_BE])
def test_back_end_illegal_transition(state, event):
    """Steered / not steered for an id not waiting: ignored (None), as the wire allows late ones;
    a second Restored or the end of a relay not known: HandoffProtocolError."""
    be = _be_in(state)
    before = be.state(9)
    if event is BeEvent.STEERED:
        assert be.steered(9) is None
    elif event is BeEvent.NOT_STEERED:
        assert be.not_steered(9) is None
    elif event is BeEvent.RESTORED:
        if before is None:                  # over: the id may not come again, but it is not known here
            be.restored(9, "again")
            assert be.state(9) is BeState.RESTORED
            return
        with pytest.raises(HandoffProtocolError, match=f"handoff 9: event RESTORED not allowed in state "
                           f"{state.name}"):
            be.restored(9, "again")
    else:
        with pytest.raises(HandoffProtocolError, match="FLOW_CLOSED"):
            be.flow_closed(9)
    assert be.state(9) is before


def test_back_end_view_of_one_session():
    be: BackEndHandoffs[str] = BackEndHandoffs()
    be.restored(1, "r1")
    be.restored(2, "r2")
    be.restored(3, "r3")
    assert be.unsteered() == [1, 2, 3] and len(be) == 3
    assert be.steered(2) == "r2" and be.state(2) is BeState.RELAYING
    assert be.steered(2) is None                            # a duplicate Steered
    assert be.flow_closed(3) is BeState.ENDED_UNSTEERED     # its relay ended while waiting
    assert be.unsteered() == [1, 3]
    # The control connection closes: every one still waiting is given up, in order.
    assert [be.not_steered(x) for x in be.unsteered()] == ["r1", "r3"]
    assert be.unsteered() == [] and be.steered(1) is None   # a Steered after giving up: ignored
    assert be.flow_closed(2) is BeState.CLOSED and len(be) == 0
