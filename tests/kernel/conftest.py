"""Fixtures for the kernel tests: the lab with a VIP, flow steering on the FE and ARP filtering on the BEs.

No daemons: the tests play FE and BE themselves with tcpha.repair and tcpha.steering, from this process,
entering the lab's namespaces per call.
"""

from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass, field

import pytest

from tcpha import repair
from tcpha.steering import ArpFilter, FlowKey, FlowSteering, VipAddress
from tcpha.steering.netns import call_in_netns
from tests.capture import FrameCapture

VPORT = 80


@dataclass
class HandoffLab:
    lab: object
    steering: FlowSteering
    listener: socket.socket
    vip: str
    vport: int = VPORT
    cleanups: list = field(default_factory=list)

    def accept_request(self, client: socket.socket, request: bytes, *, head_end: bytes = b"\r\n\r\n",
                       timeout: float = 5.0) -> socket.socket:
        """Send `request` from the client; FE accepts and peeks until the head is complete."""
        client.sendall(request)
        conn, _ = self.listener.accept()
        conn.settimeout(timeout)
        peek_until(conn, head_end, timeout)
        return conn

    def hand_off(self, conn: socket.socket, be: str = "be1") -> tuple[socket.socket, FlowKey, int]:
        """The two-phase handoff: freeze, dump, (state bytes travel), restore on the BE, forward, discard.

        Returns the BE's socket, the flow and the size of the state bytes.
        """
        cip, cport = conn.getpeername()
        vip, vport = conn.getsockname()
        flow = FlowKey(cip, cport, vip, vport)
        self.steering.freeze(flow)
        state = repair.dump(conn)
        blob = state.to_bytes()
        be_sock = call_in_netns(self.lab.netns(be), repair.restore, repair.TcpState.from_bytes(blob))
        self.steering.forward(flow, self.lab.mac(be))
        repair.discard(conn)
        be_sock.settimeout(10.0)
        return be_sock, flow, len(blob)


def peek_until(conn: socket.socket, marker: bytes, timeout: float) -> bytes:
    """MSG_PEEK until `marker` is in the receive queue (the bytes stay there)."""
    deadline = time.monotonic() + timeout
    while True:
        data = conn.recv(65536, socket.MSG_PEEK)
        if marker in data or not data:
            return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker!r} within {timeout}s (have {len(data)} bytes)")
        time.sleep(0.001)  # polling the queue with a deadline: poll() stays readable once any byte is queued


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_http_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP response with Content-Length."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed inside the response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = rest + (recv_exact(sock, length - len(rest)) if length > len(rest) else b"")
    return head, body[:length]


def http_response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.fixture(scope="module")
def handoff_lab(lab_module):
    lab = lab_module
    vip = lab.vip
    prefix = lab.prefix
    cleanups = []
    try:
        fe_vip = VipAddress(vip, lab.ifname("fe"), netns=lab.netns("fe"))
        fe_vip.add()
        cleanups.append(fe_vip.remove)
        for be in ("be1", "be2"):
            arp = ArpFilter(vip, lab.ifname(be), table=f"{prefix}arp", netns=lab.netns(be))
            arp.install()
            cleanups.append(arp.close)
            cleanups.append(arp.remove)
            be_vip = VipAddress(vip, "lo", netns=lab.netns(be))
            be_vip.add()
            cleanups.append(be_vip.remove)
        steering = FlowSteering(table=f"{prefix}fe", ifname=lab.ifname("fe"), vip=vip, ports=[VPORT],
                                netns=lab.netns("fe"))
        steering.install()
        cleanups.append(steering.close)
        cleanups.append(steering.remove)
        listener = lab.socket("fe")
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((vip, VPORT))
        listener.listen(128)
        listener.settimeout(10)
        cleanups.append(listener.close)
        yield HandoffLab(lab=lab, steering=steering, listener=listener, vip=vip)
    finally:
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception:
                pass


@pytest.fixture
def client_capture(handoff_lab):
    cap = FrameCapture(handoff_lab.lab, "client")
    try:
        yield cap
    finally:
        cap.stop()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The tests reach the helpers through the fixture (conftest modules are not importable with importlib mode).
HandoffLab.peek_until = staticmethod(peek_until)
HandoffLab.recv_exact = staticmethod(recv_exact)
HandoffLab.read_http_response = staticmethod(read_http_response)
HandoffLab.http_response = staticmethod(http_response)
HandoffLab.sha256 = staticmethod(sha256)
HandoffLab.capture = lambda self, host: FrameCapture(self.lab, host)
