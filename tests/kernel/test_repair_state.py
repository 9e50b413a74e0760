"""TcpState's wire format, and dump/restore on loopback (no namespaces needed, but CAP_NET_ADMIN)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

import pytest
from hypothesis import given, strategies as st

from tcpha import repair
from tcpha.repair import TcpState
from tcpha.sockdiag import SocketLookup
from tests.support import wait_until

u32 = st.integers(0, 2**32 - 1)
ipv4 = st.ip_addresses(v=4).map(str)
# The text form the socket module gives (which is what dump() records).
ipv6 = st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed))
port = st.integers(1, 65535)
TCP_TIME_WAIT = 6           # include/net/tcp_states.h


@st.composite
def states(draw):
    v6 = draw(st.booleans())
    ip = ipv6 if v6 else ipv4
    send_queue = draw(st.binary(max_size=300))
    return TcpState(
        family=socket.AF_INET6 if v6 else socket.AF_INET,
        local=(draw(ip), draw(port)), peer=(draw(ip), draw(port)),
        snd_seq=draw(u32), rcv_seq=draw(u32), mss=draw(st.integers(48, 65535)),
        recv_queue=draw(st.binary(max_size=300)), send_queue=send_queue,
        unsent=draw(st.integers(0, len(send_queue))),
        timestamps=draw(st.booleans()), sack=draw(st.booleans()), wscale=draw(st.booleans()),
        snd_wscale=draw(st.integers(0, 14)), rcv_wscale=draw(st.integers(0, 14)), timestamp=draw(u32),
        window=draw(st.none() | st.tuples(u32, u32, u32, u32, u32)),
    )


@given(states())
def test_round_trip(state):
    assert TcpState.from_bytes(state.to_bytes()) == state


@given(states(), st.data())
def test_corrupt_input_raises_value_error_only(state, data):
    blob = bytearray(state.to_bytes())
    cut = data.draw(st.integers(0, len(blob)))
    mutated = bytes(blob[:cut])
    if cut < len(blob):
        with pytest.raises(ValueError):
            TcpState.from_bytes(mutated)
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    try:
        TcpState.from_bytes(bytes(blob))  # may still be a valid state: it must never raise anything else
    except ValueError:
        pass


def test_version_and_length_errors_are_clear():
    blob = TcpState(family=socket.AF_INET, local=("10.0.0.1", 80), peer=("10.0.0.2", 1234), snd_seq=2**32 - 1,
                    rcv_seq=2**31, mss=1460, recv_queue=b"GET").to_bytes()
    with pytest.raises(ValueError, match="version 9 not supported"):
        TcpState.from_bytes(b"\x09" + blob[1:])
    with pytest.raises(ValueError, match="does not match its queues"):
        TcpState.from_bytes(blob + b"x")
    with pytest.raises(ValueError, match="too short"):
        TcpState.from_bytes(blob[:10])


@pytest.mark.netns  # needs CAP_NET_ADMIN
def test_loopback_dump_restore_keeps_the_stream():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    server.settimeout(5)
    restored = None
    try:
        client.sendall(b"request")
        assert server.recv(7, socket.MSG_PEEK | socket.MSG_WAITALL) == b"request"
        state = repair.dump(server)
        assert state.recv_queue == b"request"
        assert state.local == server.getsockname() and state.peer == server.getpeername()
        repair.discard(server)
        restored = repair.restore(TcpState.from_bytes(state.to_bytes()))
        restored.settimeout(5)
        assert restored.recv(7) == b"request"
        payload = os.urandom(300_000)
        restored.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += client.recv(65536)
        assert got == payload
        client.sendall(b"more")
        assert restored.recv(4) == b"more"
        # A second restored connection on the same local port binds fine (SO_REUSEADDR before TCP_REPAIR).
        client2 = socket.create_connection(listener.getsockname(), timeout=5)
        server2, _ = listener.accept()
        state2 = repair.dump(server2)
        repair.discard(server2)
        restored2 = repair.restore(state2)
        client2.sendall(b"x")
        restored2.settimeout(5)
        assert restored2.recv(1) == b"x"
        restored2.close()
        client2.close()
    finally:
        client.close()
        listener.close()
        if restored is not None:
            restored.close()


@pytest.mark.netns
def test_resume_rolls_back():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    server.settimeout(5)
    try:
        client.sendall(b"hi")
        assert server.recv(2, socket.MSG_PEEK | socket.MSG_WAITALL) == b"hi"
        repair.dump(server)
        repair.resume(server)
        assert server.recv(2) == b"hi"
        server.sendall(b"back")
        assert client.recv(4) == b"back"
    finally:
        client.close()
        server.close()
        listener.close()


@pytest.mark.netns
def test_silence_then_close_sends_no_fin():
    """A silenced live socket closes without a FIN: the peer sees no end of stream; what it sends next
    finds no socket and is answered with RST (the back end's way to let go of a connection that lives
    on elsewhere: tcpha/be/handoff.py)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    try:
        server.sendall(b"before")
        assert client.recv(6, socket.MSG_WAITALL) == b"before"
        repair.silence(server)
        server.close()
        client.sendall(b"after")
        # A FIN would make this recv return b"" (end of stream) before any RST.
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    finally:
        client.close()
        server.close()
        listener.close()


@pytest.mark.netns
def test_bytes_read_off_a_socket_travel_back_in_front_of_its_queue():
    """A back end that read a request off the client's socket and holds it (to move the connection) gives
    it back with with_unread(): the restored socket reads the held bytes, then what was still queued, then
    what the client sends next, in order; and answers still reach the client."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    server.settimeout(5)
    restored = None
    try:
        client.sendall(b"GET /a.jpg HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
        first = b"GET /a.jpg HTTP/1.1\r\n\r\n"
        held = server.recv(len(first), socket.MSG_WAITALL)
        assert held == first
        state = repair.dump(server)
        assert state.recv_queue == b"GET /b HTTP/1.1\r\n\r\n"
        repair.discard(server)
        moved = TcpState.from_bytes(state.with_unread(held).to_bytes())
        assert moved.rcv_seq == state.rcv_seq
        restored = repair.restore(moved)
        restored.settimeout(5)
        client.sendall(b"GET /c HTTP/1.1\r\n\r\n")
        want = b"GET /a.jpg HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n"
        assert restored.recv(len(want), socket.MSG_WAITALL) == want
        answer = b"HTTP/1.1 204 No Content\r\n\r\n"
        restored.sendall(answer)
        assert client.recv(len(answer), socket.MSG_WAITALL) == answer
    finally:
        client.close()
        listener.close()
        if restored is not None:
            restored.close()



def test_a_dumped_socket_still_takes_and_acknowledges_late_bytes():
    """Why the front end checks repair.received_since before steering a flow away: repair mode does not
    stop reception, so a segment that passed the freeze late is queued on the dumped socket and
    acknowledged to the client, which will never send it again; the dumped state lacks it."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    try:
        client.sendall(b"head")
        assert server.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL) == b"head"
        state = repair.dump(server)
        assert state.recv_queue == b"head" and repair.received_since(server, state) == 0
        client.sendall(b"body!")
        assert wait_until(lambda: repair.received_since(server, state) == 5, 5, "the late bytes queued")
        def unacknowledged() -> int:             # the client's send queue (SIOCOUTQ = TIOCOUTQ)
            return struct.unpack("=i", fcntl.ioctl(client.fileno(), termios.TIOCOUTQ, bytes(4)))[0]
        assert wait_until(lambda: unacknowledged() == 0, 5, "the client's bytes all acknowledged")
    finally:
        client.close()
        repair.discard(server)
        listener.close()


def _out_by_resume(server: socket.socket) -> socket.socket:
    repair.dump(server)
    repair.resume(server)
    return server


def _out_by_announce(server: socket.socket) -> socket.socket:
    repair.announce(server)
    return server


def _out_by_restore(server: socket.socket) -> socket.socket:
    state = repair.dump(server)
    repair.discard(server)
    return repair.restore(state)


@pytest.mark.netns
@pytest.mark.parametrize("way_out", [_out_by_resume, _out_by_announce, _out_by_restore],
                         ids=["resume", "announce", "restore"])
def test_a_connection_out_of_repair_mode_leaves_its_port_bindable(way_out):
    """Switching repair off leaves the socket with no SO_REUSEADDR (the kernel sets sk_reuse to none).
    Its connection, and the TIME_WAIT after it, would then make a new listener's bind() of the same
    address fail with EADDRINUSE for a minute: a front end restarted after kill -9, a back end's
    application restarted on the VIP. Every way out of repair mode gives SO_REUSEADDR back."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    client = socket.create_connection(address, timeout=5)
    client_address = client.getsockname()
    server, _ = listener.accept()
    moved = way_out(server)
    assert moved.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    lookup = SocketLookup()
    again = socket.socket()
    try:
        moved.close()                   # this side closes first: its socket ends in TIME_WAIT
        client.close()
        assert wait_until(lambda: lookup.state(address, client_address) == TCP_TIME_WAIT, 5,
                          "the moved connection in TIME_WAIT")
        listener.close()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(address)             # EADDRINUSE without the fix
        again.listen()
    finally:
        again.close()
        lookup.close()
        client.close()
        moved.close()
        listener.close()
