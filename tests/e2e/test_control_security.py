"""A running tcpha-be refuses forged, replayed and malformed control traffic, and never creates a socket
for it; the same handoff with the right key does create one (so the checks can fail)."""

from __future__ import annotations

import socket

import pytest

from tcpha import control, repair
from tests.support import wait_until

pytestmark = pytest.mark.netns

CONTROL_PORT = 666


def fake_state(vip: str, client_ip: str, client_port: int) -> bytes:
    """The TCP state of a connection VIP:80 <- client: what a front end would send for a handoff."""
    return repair.TcpState(family=socket.AF_INET, local=(vip, 80), peer=(client_ip, client_port),
                           snd_seq=1_000_000, rcv_seq=2_000_000, mss=1448, window=None).to_bytes()


def handoff(dep, client_port: int, xid: int = 1) -> control.Handoff:
    client = dep.lab.ip("client")
    return control.Handoff(xid=xid, client_ip=client, client_port=client_port, vip=dep.vip, vport=80,
                           peeked_len=0, state=fake_state(dep.vip, client, client_port))


class Peer:
    """A hand-driven front end: a socket to the back end's control port and a ControlConnection."""

    def __init__(self, dep, key: bytes):
        self.sock = dep.lab.connect("fe", dep.lab.ip("be1"), CONTROL_PORT, timeout=5)
        self.conn = control.ControlConnection(key, role="fe")
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)

    def hello(self) -> None:
        self.write(self.conn.send(control.Hello(node_id="test", vaddr="0.0.0.0")))
        msgs = self.read_messages()
        assert isinstance(msgs[0], control.Hello)

    def read_messages(self, timeout: float = 5.0) -> list:
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(65536)
            assert data, "the back end closed the connection"
            msgs = self.conn.feed(data)
            if msgs:
                return msgs

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the back end drops the connection (EOF or reset) without another message."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                # only the back end's Hello may arrive before it drops us
                if any(not isinstance(m, control.Hello) for m in self._decode(data)):
                    return False
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def _decode(self, data: bytes) -> list:
        try:
            return self.conn.feed(data)
        except control.ControlError:
            return [control.Hello()]          # the BE's Hello under another key: not an answer

    def close(self) -> None:
        self.sock.close()


def restored_sockets(dep, client_port: int) -> int:
    # src VIP: the restored client socket (with appsource transparent, the application's socket of the
    # connection from client:port is also established towards the client's address)
    out = dep.lab.run("be1", ["ss", "-Htn", "state", "established", f"dst {dep.lab.ip('client')}:{client_port}",
                              f"src {dep.vip}"],
                      capture_output=True, text=True).stdout
    return len([l for l in out.splitlines() if l.strip()])


def test_forged_replayed_and_malformed_control_traffic_is_refused(fresh):
    dep = fresh
    dep.start_origins()
    dep.start_backend("be1")
    be_log = dep.lab.log_path("be1", "tcpha-be")
    key = dep.key.read_bytes().strip()
    wrong = bytes(reversed(key))

    # 1. a whole session under the wrong key: the Hello's MAC fails, nothing is acted on
    p = Peer(dep, wrong)
    fake_be = control.ControlConnection(wrong, role="be")     # to get past our own hello exchange
    hello = p.conn.send(control.Hello(node_id="forger"))
    p.conn.feed(fake_be.send(control.Hello()))
    p.write(hello + p.conn.send(handoff(dep, 40001)))
    assert p.closed_by_peer()
    p.close()

    # 2. a recorded authentic session replayed on a new connection: the back end's fresh nonce
    #    makes every recorded frame fail
    p = Peer(dep, key)
    p.hello()
    p.write(p.conn.send(control.Ping(token=7)))
    assert p.read_messages() == [control.Pong(token=7)]
    p.write(p.conn.send(handoff(dep, 40002, xid=2)))
    recorded = bytes(p.sent)
    # the authentic handoff was acted on: restored
    assert isinstance(p.read_messages()[0], control.Restored)
    authentic = p                      # kept open: it never sends Steered (checked at the end)
    replay = Peer(dep, key)
    replay.write(recorded)
    assert replay.closed_by_peer()
    replay.close()

    # 3. a frame replayed inside its own connection (same sequence number again)
    p = Peer(dep, key)
    p.hello()
    frame = p.conn.send(control.Ping(token=9))
    p.write(frame)
    assert p.read_messages() == [control.Pong(token=9)]
    p.write(frame)
    assert p.closed_by_peer()
    p.close()

    # 4. an authentic handoff frame with one byte changed in the TCP state
    p = Peer(dep, key)
    p.hello()
    frame = bytearray(p.conn.send(handoff(dep, 40003, xid=3)))
    frame[40] ^= 0x01
    p.write(bytes(frame))
    assert p.closed_by_peer()
    p.close()

    # 5. an authentic handoff of a connection to another address than the VIP: refused, no socket
    p = Peer(dep, key)
    p.hello()
    client = dep.lab.ip("client")
    other = control.Handoff(xid=5, client_ip=client, client_port=40005, vip=dep.vip, vport=80, peeked_len=0,
                            state=repair.TcpState(family=socket.AF_INET, local=(dep.lab.ip("be1"), 80),
                                                  peer=(client, 40005), snd_seq=1, rcv_seq=2, mss=1448,
                                                  window=None).to_bytes())
    p.write(p.conn.send(other))
    answer = p.read_messages()[0]
    assert isinstance(answer, control.Refused) and answer.xid == 5
    assert "is not this back end's VIP" in answer.reason
    assert restored_sockets(dep, 40005) == 0
    p.close()

    # 6. garbage
    p = Peer(dep, key)
    p.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 100)
    assert p.closed_by_peer()
    p.close()

    # no socket for any of the forged flows; the authentic one was restored
    assert restored_sockets(dep, 40001) == 0
    assert restored_sockets(dep, 40003) == 0
    assert restored_sockets(dep, 40002) == 1
    # ... and, since its front end never said Steered (as when it took the connection back after
    # its handofftimeout), it is dropped silently after STEER_WAIT instead of answering the client
    from tcpha.be.handoff import STEER_WAIT
    wait_until(lambda: not restored_sockets(dep, 40002), STEER_WAIT + 5, "the unsteered socket dropped",
               interval=0.1)
    assert restored_sockets(dep, 40002) == 0
    assert "no Steered within" in be_log.read_text()
    authentic.close()
    # the back end is still running, and logged each drop
    assert dep.be_procs["be1"].poll() is None
    wait_until(lambda: be_log.read_text().count("dropped") >= 4, 5, "four drops logged", interval=0.05)
    text = be_log.read_text()
    assert text.count("dropped") >= 4, text
    assert "wrong authkey" in text or "bad MAC" in text
    assert "replayed" in text
