"""tcpha.be.handoff.HandoffReceiver without root or sockets: what the back end answers to a front end's
Hello, Ping and Handoff before anything touches the kernel (each refusal happens before repair.restore)."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest

from tcpha import control
from tcpha.be.handoff import ControlSession, HandoffReceiver
from tcpha.be.server import BackEndStats
from tcpha.control.handoff import BackEndHandoffs, BeState
from tcpha.repair import TcpState

VIP = "192.0.2.10"
CLIENT = ("198.51.100.7", 40000)


class FakeSession:
    """What HandoffReceiver uses of a ControlSession: its peer, its handoffs (the state machine's back-end
    view), send() and abort()."""

    def __init__(self) -> None:
        self.peer = "203.0.113.1:5000"
        self.sent: list[Any] = []
        self.aborted = False
        self.node_id = ""
        self.handoffs: BackEndHandoffs = BackEndHandoffs()    # the state machine's back-end view

    def send(self, msg: Any) -> bool:
        self.sent.append(msg)
        return True

    def abort(self) -> None:
        self.aborted = True


def _backend(**overrides: Any) -> SimpleNamespace:
    be = SimpleNamespace(config=SimpleNamespace(raddr="203.0.113.2", port=5000, vaddr=VIP), authkey=b"k" * 32,
                         vip=VIP, app_addr=("127.0.0.1", 8080), maxclients=10, stopping=False,
                         stats=BackEndStats(), relays=set(), loop=None, tls=None, lan_mac=None)
    for name, value in overrides.items():
        setattr(be, name, value)
    return be


def _handoff(local_ip: str = VIP, *, vport: int = 80, client: tuple[str, int] = CLIENT,
             state: bytes | None = None) -> control.Handoff:
    if state is None:
        state = TcpState(family=socket.AF_INET, local=(local_ip, 80), peer=CLIENT, snd_seq=1, rcv_seq=2,
                         mss=1460).to_bytes()
    return control.Handoff(xid=7, client_ip=client[0], client_port=client[1], vip=VIP, vport=vport,
                           peeked_len=0, state=state)


@pytest.mark.parametrize("backend, handoff, reason", [
    (dict(stopping=True), {}, "stopping"),
    (dict(maxclients=0), {}, "busy: 0 connections (maxclients)"),
    ({}, dict(state=b"\x01\x04"), "malformed TCP state: TCP state too short"),
    ({}, dict(local_ip="192.0.2.99"), f"local address 192.0.2.99 is not this back end's VIP {VIP}"),
    ({}, dict(vport=443), "the TCP state does not match the handoff's flow"),
    ({}, dict(client=(CLIENT[0], CLIENT[1] + 1)), "the TCP state does not match the handoff's flow"),
], ids=["stopping", "busy", "malformed", "not-our-vip", "other-port", "other-client"])
def test_a_handoff_is_refused_before_any_restore(backend, handoff, reason):
    be = _backend(**backend)
    session = FakeSession()
    HandoffReceiver(be).on_message(session, _handoff(**handoff))
    assert len(session.sent) == 1
    answer = session.sent[0]
    assert isinstance(answer, control.Refused) and answer.xid == 7
    assert answer.reason.startswith(reason), answer.reason
    assert (be.stats.refused, be.stats.handoffs, be.relays) == (1, 0, set())


def test_a_hello_for_another_vip_drops_the_session():
    receiver = HandoffReceiver(_backend())
    session = FakeSession()
    receiver.unsent_closed.append(control.FlowClosed(client_ip=CLIENT[0], client_port=CLIENT[1], vip=VIP, vport=80))
    receiver.on_message(session, control.Hello(node_id="tcpha-fe x", vaddr="192.0.2.99"))
    assert session.aborted and session.sent == []
    assert len(receiver.unsent_closed) == 1          # kept for a front end of ours


def test_the_first_hello_of_our_front_end_takes_the_queued_flowclosed():
    receiver = HandoffReceiver(_backend())
    closed = [control.FlowClosed(client_ip=CLIENT[0], client_port=port, vip=VIP, vport=80) for port in (1, 2)]
    receiver.unsent_closed.extend(closed)
    session = FakeSession()
    receiver.on_message(session, control.Hello(node_id="tcpha-fe worker 1", vaddr=VIP))
    assert not session.aborted and session.node_id == "tcpha-fe worker 1"
    assert session.sent == closed and receiver.unsent_closed == []


def test_health_sessions_and_only_those_are_closed():
    receiver = HandoffReceiver(_backend())
    health, worker = FakeSession(), FakeSession()
    health.node_id, worker.node_id = "tcpha-fe health checker", "tcpha-fe worker 1"
    closed = []
    health.close = lambda: closed.append("health")          # type: ignore[attr-defined]
    worker.close = lambda: closed.append("worker")          # type: ignore[attr-defined]
    receiver.sessions.update((health, worker))
    receiver.close_health_sessions()
    assert closed == ["health"]


def test_ping_is_answered_with_no_session_counters_without_tls():
    session = FakeSession()
    HandoffReceiver(_backend()).on_message(session, control.Ping(token=42))
    assert session.sent == [control.Pong(token=42, session_lookups=0, session_hits=0)]


# -- Steered and giving up, through the state machine's back-end view (tcpha.control.handoff) ---------

class FakeRelay:
    client = None
    closed = False
    discarded = False

    def __init__(self) -> None:
        self.released = self.closes = 0

    def release(self) -> None:
        self.released += 1

    def close(self) -> None:
        self.closes += 1
        self.closed = True


class FakeTimer:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _restored(session: FakeSession, xid: int = 7) -> tuple[FakeRelay, FakeTimer]:
    relay, timer = FakeRelay(), FakeTimer()
    session.handoffs.restored(xid, (relay, timer))
    return relay, timer


def test_a_handoff_reusing_an_id_in_use_is_refused_before_any_restore():
    be = _backend()
    session = FakeSession()
    relay, timer = _restored(session)
    HandoffReceiver(be).on_message(session, _handoff())
    assert [type(m) for m in session.sent] == [control.Refused]
    assert session.sent[0].reason == "handoff id 7 is already in use on this connection"
    assert session.handoffs.state(7) is BeState.RESTORED and not timer.cancelled and relay.closes == 0


def test_steered_releases_the_held_relay_once():
    receiver = HandoffReceiver(_backend())
    session = FakeSession()
    relay, timer = _restored(session)
    receiver.on_message(session, control.Steered(xid=7))
    assert (relay.released, timer.cancelled, session.handoffs.state(7)) == (1, True, BeState.RELAYING)
    receiver.on_message(session, control.Steered(xid=7))        # a duplicate: nothing
    receiver.on_message(session, control.Steered(xid=8))        # never restored here: nothing
    assert relay.released == 1 and session.sent == []
    receiver.not_steered(session, 7, "too late")                 # the STEER_WAIT timer, had it run
    assert relay.closes == 0 and not relay.discarded


def test_no_steered_in_time_drops_the_copy_and_a_late_steered_is_ignored():
    receiver = HandoffReceiver(_backend())
    session = FakeSession()
    relay, timer = _restored(session)
    receiver.not_steered(session, 7, "no Steered within 5 s")
    assert (relay.discarded, relay.closes, timer.cancelled, session.handoffs.state(7)) == (True, 1, True, None)
    receiver.on_message(session, control.Steered(xid=7))
    assert relay.released == 0


def test_the_end_of_a_relay_closes_its_handoff():
    ended = []
    receiver = HandoffReceiver(_backend(relay_ended=ended.append, loop=SimpleNamespace(call_later=lambda *a: None)))
    session = FakeSession()
    relay, _ = _restored(session)
    receiver.on_message(session, control.Steered(xid=7))
    receiver._flow_closed(session, (CLIENT[0], CLIENT[1], VIP, 80), relay, 7)
    assert ended == [relay] and session.handoffs.state(7) is None and len(session.handoffs) == 0


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def get_extra_info(self, name: str) -> Any:
        return ("203.0.113.1", 5000) if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_flow_closed_is_queued_not_sent_on_a_session_still_waiting_for_its_hello():
    """A front end that has connected but not said Hello yet (a new worker, a restarted front end) has no
    session key: the FlowClosed of a flow whose own session is gone is kept for the first Hello, not
    sent there (that raised inside the event loop and lost the report)."""
    receiver = HandoffReceiver(_backend())
    gone = FakeSession()
    gone.send = lambda msg: False                     # type: ignore[method-assign]  # its connection closed
    new = ControlSession(receiver)
    transport = FakeTransport()
    new.connection_made(transport)                   # our Hello goes out; the front end's has not come
    assert new in receiver.sessions and len(transport.written) == 1
    receiver._send_flow_closed(gone, ("198.51.100.7", 40000, VIP, 80), 7)
    assert new._out == [] and len(transport.written) == 1
    assert [(m.client_port, m.xid) for m in receiver.unsent_closed] == [(40000, 7)]
