"""A real TCP handoff between namespaces, without daemons: FE freezes, dumps, the BE restores, FE steers.

The client never notices: it sees the right bytes, no RST, and keeps talking to the VIP.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest

from tcpha import repair
from tcpha.steering import FlowKey, FlowSteering, neighbour_mac
from tcpha.steering.netns import call_in_netns
from tests.support import fixed_client_port, wait_until

pytestmark = pytest.mark.netns

MB = 1 << 20


def _client(h):
    return h.lab.connect("client", h.vip, h.vport, timeout=20)


def test_get_and_keepalive_served_by_backend(handoff_lab, client_capture):
    h = handoff_lab
    client = _client(h)
    be_sock = None
    try:
        req1 = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
        conn = h.accept_request(client, req1)
        be_sock, flow, _ = h.hand_off(conn, "be1")
        assert be_sock.getsockname() == (h.vip, h.vport)
        assert be_sock.getpeername() == client.getsockname()
        # The request the FE only peeked at is in the BE's receive queue, exactly once.
        assert h.recv_exact(be_sock, len(req1)) == req1
        be_sock.sendall(h.http_response(b"from be1 #1"))
        assert h.read_http_response(client)[1] == b"from be1 #1"
        # Keep-alive: the second request on the same connection is steered to the BE by the FE's kernel.
        req2 = b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
        client.sendall(req2)
        assert h.recv_exact(be_sock, len(req2)) == req2
        be_sock.sendall(h.http_response(b"from be1 #2"))
        assert h.read_http_response(client)[1] == b"from be1 #2"
        assert flow in h.steering.forwarded()
        assert h.steering.forwarded()[flow] == h.lab.mac("be1")
        # The client still believes the VIP is the FE (ARP), yet the answers came from be1.
        assert neighbour_mac(h.vip, h.lab.ifname("client"), netns=h.lab.netns("client")) == h.lab.mac("fe")
        client.close()
        assert be_sock.recv(10) == b""  # the client's FIN reached the BE too
    finally:
        client.close()
        if be_sock is not None:
            be_sock.close()
    client_capture.stop()
    assert client_capture.tcp_resets() == []


def test_download_20mb_mostly_bypasses_fe(handoff_lab, client_capture):
    h = handoff_lab
    size = 20 * MB
    payload = os.urandom(MB) * 20
    client = _client(h)
    be_sock = None
    try:
        req = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
        conn = h.accept_request(client, req)
        be_sock, flow, _ = h.hand_off(conn, "be1")
        assert h.recv_exact(be_sock, len(req)) == req
        before = h.lab.counters("fe")
        sender = threading.Thread(target=be_sock.sendall, args=(h.http_response(payload),), daemon=True)
        sender.start()
        head, body = h.read_http_response(client)
        sender.join(30)
        after = h.lab.counters("fe")
        assert len(body) == size and h.sha256(body) == h.sha256(payload)
        fe_tx = after.tx_bytes - before.tx_bytes
        # The FE only relays the client's ACKs to the BE: well under 5% of what the client received.
        assert fe_tx < 0.05 * size, f"FE transmitted {fe_tx} bytes for a {size}-byte download"
        assert fe_tx > 0  # ... but it did relay them (the steering is on the path)
    finally:
        client.close()
        if be_sock is not None:
            be_sock.close()
    client_capture.stop()
    assert client_capture.tcp_resets() == []


def test_upload_in_flight_at_handoff_arrives_exactly(handoff_lab, client_capture):
    h = handoff_lab
    body = os.urandom(10 * MB)
    head = b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    client = _client(h)
    be_sock = None
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            client.sendall(body)
        except BaseException as exc:
            errors.append(exc)

    try:
        conn = h.accept_request(client, head)
        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        # Let part of the body pile up in the FE's receive queue, so it must travel in the state.
        wait_until(lambda: len(conn.recv(1 << 20, socket.MSG_PEEK)) >= len(head) + 64 * 1024, 5,
                   "64 KiB of the body queued", interval=0.001)
        be_sock, flow, state_len = h.hand_off(conn, "be2")
        assert state_len > 64 * 1024  # the queued body went with the state
        got = h.recv_exact(be_sock, len(head) + len(body))
        uploader.join(30)
        assert not errors
        assert got[: len(head)] == head
        assert h.sha256(got[len(head):]) == h.sha256(body)
        be_sock.sendall(h.http_response(b"stored"))
        assert h.read_http_response(client)[1] == b"stored"
    finally:
        client.close()
        if be_sock is not None:
            be_sock.close()
    client_capture.stop()
    assert client_capture.tcp_resets() == []


def test_send_queue_travels_unacked_and_unsent(handoff_lab, client_capture):
    """Bytes the FE wrote before the handoff (some unacknowledged, some never sent) reach the client once."""
    h = handoff_lab
    client = _client(h)
    be_sock = None
    early = os.urandom(4 * MB)
    late = os.urandom(MB)
    try:
        conn = h.accept_request(client, b"GET /q HTTP/1.1\r\n\r\n")
        cip, cport = conn.getpeername()
        flow = FlowKey(cip, cport, h.vip, h.vport)
        h.steering.freeze(flow)  # the client's ACKs are now dropped: what the FE sends stays unacked
        conn.setblocking(False)
        sent = 0
        try:
            while sent < len(early):
                sent += conn.send(early[sent:])
        except BlockingIOError:
            pass
        conn.setblocking(True)
        state = repair.dump(conn)
        assert len(state.send_queue) > 0
        assert state.send_queue == early[sent - len(state.send_queue):sent]
        blob = state.to_bytes()
        be_sock = call_in_netns(h.lab.netns("be1"), repair.restore, repair.TcpState.from_bytes(blob))
        h.steering.forward(flow, h.lab.mac("be1"))
        repair.discard(conn)
        be_sock.settimeout(20)
        assert h.recv_exact(be_sock, 19) == b"GET /q HTTP/1.1\r\n\r\n"  # read, or close() would reset
        sender = threading.Thread(target=be_sock.sendall, args=(early[sent:] + late,), daemon=True)
        sender.start()
        got = h.recv_exact(client, len(early) + len(late))
        sender.join(20)
        assert h.sha256(got) == h.sha256(early + late)
    finally:
        client.close()
        if be_sock is not None:
            be_sock.close()
    client_capture.stop()
    assert client_capture.tcp_resets() == []


def test_rollback_keeps_connection_on_fe(handoff_lab, client_capture):
    h = handoff_lab
    client = _client(h)
    conn = None
    try:
        req = b"GET /stay HTTP/1.1\r\n\r\n"
        conn = h.accept_request(client, req)
        cip, cport = conn.getpeername()
        flow = FlowKey(cip, cport, h.vip, h.vport)
        h.steering.freeze(flow)
        # Sent while frozen: dropped by the FE's kernel, so it is not in the dumped state ...
        client.sendall(b"late bytes")
        state = repair.dump(conn)
        assert state.recv_queue == req
        # ... the back end "refused": take the connection back.
        repair.resume(conn)
        h.steering.thaw(flow)
        assert h.steering.frozen_entries() == 0
        # ... and the retransmitted bytes now reach the FE, after the request, exactly once.
        expected = req + b"late bytes"
        assert h.recv_exact(conn, len(expected)) == expected
        conn.sendall(h.http_response(b"from fe"))
        assert h.read_http_response(client)[1] == b"from fe"
        client.sendall(b"again")
        assert h.recv_exact(conn, 5) == b"again"
        assert flow not in h.steering.forwarded()
    finally:
        client.close()
        if conn is not None:
            conn.close()
    client_capture.stop()
    assert client_capture.tcp_resets() == []


def test_restarted_fe_adopts_table_and_live_flows_keep_working(handoff_lab):
    h = handoff_lab
    client = _client(h)
    be_sock = None
    try:
        req = b"GET /a HTTP/1.1\r\n\r\n"
        conn = h.accept_request(client, req)
        be_sock, flow, _ = h.hand_off(conn, "be2")
        assert h.recv_exact(be_sock, len(req)) == req
        # A new FE instance (the old one "crashed"): same table name, adopts instead of duplicating.
        again = FlowSteering(table=h.steering.table, ifname=h.lab.ifname("fe"), vip=h.vip, ports=[h.vport],
                             netns=h.lab.netns("fe"))
        again.install()
        assert again.adopted
        assert again.forwarded().get(flow) == h.lab.mac("be2")
        tables = h.lab.run("fe", ["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
        assert tables.count(f"table netdev {h.steering.table}\n") == 1
        client.sendall(b"GET /b HTTP/1.1\r\n\r\n")
        assert h.recv_exact(be_sock, 19) == b"GET /b HTTP/1.1\r\n\r\n"
        be_sock.sendall(h.http_response(b"still be2"))
        assert h.read_http_response(client)[1] == b"still be2"
        # The connection ends (both FINs through the adopted table), then the entry goes.
        client.shutdown(socket.SHUT_WR)
        assert be_sock.recv(1) == b""
        be_sock.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        again.unforward(flow)
        assert flow not in h.steering.forwarded()
        again.close()
    finally:
        client.close()
        if be_sock is not None:
            be_sock.close()


def test_dump_refuses_a_connection_not_established(handoff_lab):
    h = handoff_lab
    client = _client(h)
    try:
        conn = h.accept_request(client, b"GET / HTTP/1.1\r\n\r\n")
        client.shutdown(socket.SHUT_WR)
        wait_until(lambda: conn.getsockopt(socket.IPPROTO_TCP, repair.TCP_INFO, 1)[0] == 8, 5,
                   "CLOSE_WAIT", interval=0.001)
        with pytest.raises(repair.RepairError, match="CLOSE_WAIT"):
            repair.dump(conn)
        # Not left in repair mode: the FE can still answer normally.
        conn.sendall(b"bye")
        assert client.recv(3) == b"bye"
        conn.close()
    finally:
        client.close()


def test_many_sequential_handoffs_without_errors_or_resets(handoff_lab, client_capture):
    h = handoff_lab
    flows = set()
    for i in range(300):
        be = "be1" if i % 2 else "be2"
        client = _client(h)
        be_sock = None
        try:
            req = b"GET /n/%d HTTP/1.1\r\nConnection: close\r\n\r\n" % i
            conn = h.accept_request(client, req)
            be_sock, flow, _ = h.hand_off(conn, be)
            assert h.recv_exact(be_sock, len(req)) == req
            body = b"%s answers %d" % (be.encode(), i)
            be_sock.sendall(h.http_response(body))
            be_sock.shutdown(socket.SHUT_WR)
            assert h.read_http_response(client)[1] == body
            assert client.recv(1) == b""  # the BE's FIN
            client.close()
            assert be_sock.recv(1) == b""  # the client's FIN reached the BE through the FE
            flows.add(flow)
            h.steering.unforward(flow)  # what the FE does when the BE reports the close
        finally:
            client.close()
            if be_sock is not None:
                be_sock.close()
    # (a set: a later connection may get a port an earlier one had, once that one is closed)
    assert flows and not flows & set(h.steering.forwarded())
    client_capture.stop()
    assert client_capture.tcp_resets() == []


def _connect_from_port(h, port: int) -> socket.socket:
    """A client connection to the VIP from a fixed source port (a client reusing its port)."""
    c = h.lab.socket("client")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("0.0.0.0", port))
    c.settimeout(10)
    c.connect((h.vip, h.vport))
    return c


def test_client_port_reuse_with_stale_entries(handoff_lab, client_capture):
    """A new connection on the 4-tuple of an old one works although the old entries were never removed."""
    h = handoff_lab
    port = fixed_client_port(h.lab)

    flow = None
    for be in ("be1", "be2", "be1"):
        client = _connect_from_port(h, port)
        be_sock = None
        try:
            req = b"GET /reuse HTTP/1.0\r\n\r\n"
            conn = h.accept_request(client, req)
            be_sock, flow, _ = h.hand_off(conn, be)
            assert h.recv_exact(be_sock, len(req)) == req
            be_sock.sendall(h.http_response(be.encode()))
            be_sock.shutdown(socket.SHUT_WR)
            assert h.read_http_response(client)[1] == be.encode()
            assert client.recv(1) == b""
            client.close()
            assert be_sock.recv(1) == b""
            assert flow in h.steering.forwarded()  # never unforwarded: stale for the next round
        finally:
            client.close()
            if be_sock is not None:
                be_sock.close()
    # A handoff that died half-way leaves a frozen entry: the next connection on that 4-tuple still works.
    h.steering.freeze(flow)
    client = _connect_from_port(h, port)
    try:
        conn = h.accept_request(client, b"GET /fe HTTP/1.0\r\n\r\n")
        assert h.recv_exact(conn, 20) == b"GET /fe HTTP/1.0\r\n\r\n"
        conn.sendall(h.http_response(b"fe"))
        conn.shutdown(socket.SHUT_WR)
        assert h.read_http_response(client)[1] == b"fe"
        assert client.recv(1) == b""
        client.close()
        assert conn.recv(1) == b""
        conn.close()
    finally:
        client.close()
    client_capture.stop()
    assert client_capture.tcp_resets() == []


def test_restore_over_an_old_fin_wait_socket_of_the_same_client_port(handoff_lab):
    """The back end closed an earlier connection first and the client's FIN never reached it (its steering
    entry was already gone): the back end still holds that socket in FIN-WAIT-2, and repair-mode connect()
    on the same 4-tuple fails with EADDRNOTAVAIL when the client reuses its port. The back end's restore
    destroys the dead socket and goes on (tcpha.be.handoff.restore_handed_off, tcpha.sockdiag)."""
    from tcpha.be.handoff import restore_handed_off
    h = handoff_lab
    port = fixed_client_port(h.lab)

    def socket_states(*extra: str) -> str:
        return h.lab.run("be1", ["ss", "-Htan", *extra, f"dport = :{port}"], capture_output=True, text=True).stdout

    def until(cond, timeout: float = 5.0) -> bool:       # a kernel state change: no event to wait on
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    client = _connect_from_port(h, port)
    conn = h.accept_request(client, b"GET /old HTTP/1.0\r\n\r\n")
    be_sock_old, flow, _ = h.hand_off(conn, "be1")
    old_ino = os.fstat(be_sock_old.fileno()).st_ino
    be_sock_old.recv(65536)
    be_sock_old.shutdown(socket.SHUT_WR)              # the back end closes first ...
    assert client.recv(1) == b""
    assert until(lambda: "FIN-WAIT-2" in socket_states()), socket_states()   # ... and has the client's ACK
    h.steering.unforward(flow)                         # the flow's entry goes before the client's FIN
    client.close()                                     # that FIN reaches the front end, not the back end
    # be_sock stays open, as a relay waiting for the client's end would keep it (an orphaned FIN-WAIT-2
    # socket is a timewait mini-socket, which does not block a repair-mode connect)
    assert "FIN-WAIT-2" in socket_states()
    assert f"ino:{old_ino} " in socket_states("-e")      # what the check after the restore looks for

    client = _connect_from_port(h, port)
    try:
        req = b"GET /new HTTP/1.0\r\n\r\n"
        conn = h.accept_request(client, req)
        cip, cport = conn.getpeername()
        flow = FlowKey(cip, cport, h.vip, h.vport)
        h.steering.freeze(flow)
        state = repair.TcpState.from_bytes(repair.dump(conn).to_bytes())
        with pytest.raises(OSError) as raised:             # the condition, as a plain restore meets it
            call_in_netns(h.lab.netns("be1"), repair.restore, state)
        assert raised.value.errno == errno.EADDRNOTAVAIL
        be_sock = call_in_netns(h.lab.netns("be1"), restore_handed_off, state)
        h.steering.forward(flow, h.lab.mac("be1"))
        repair.discard(conn)
        be_sock.settimeout(10)
        assert h.recv_exact(be_sock, len(req)) == req
        be_sock.sendall(h.http_response(b"new"))
        be_sock.shutdown(socket.SHUT_WR)
        assert h.read_http_response(client)[1] == b"new"
        # the old socket is gone from the kernel's tables (by its inode: the new socket has the same
        # 4-tuple and reaches FIN-WAIT-2 itself as soon as the client ACKs its FIN)
        assert f"ino:{old_ino} " not in socket_states("-e") + " "
        with pytest.raises(OSError):                        # the old socket is gone
            be_sock_old.send(b"x")
    finally:
        client.close()
        be_sock_old.close()
