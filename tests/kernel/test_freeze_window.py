"""Adversarial client packets inside the freeze window of a handoff.

The freeze window is the time between the front end's freeze (the flow's packets are dropped in its
kernel) and the steering to the back end's restored socket. The tests drive the same steps as the
daemons, with tcpha's own modules (FlowSteering.freeze/forward, repair.dump/restore/discard), and stop
between them to put packets on the wire from the client's namespace: the client's real socket (data,
FIN and RST from its own kernel, which it retransmits) and segments forged with scapy from the flow's
sequence numbers as the kernel reports them (the dumped state) and sent through a raw socket in the
client's namespace. Every forged packet is sent once inside the window and once more right after the
steering, where it reaches the restored socket: a copy that was delayed in the network.

Outcome required: the connection continues byte-exact on the back end, or it is reset cleanly on both
ends; every wait is bounded, so a hang fails the test.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP

from tcpha import repair
from tcpha.steering import FlowKey
from tcpha.steering.netns import call_in_netns
from tests.capture import tcp_segment, window_probes
from tests.support import wait_until

pytestmark = pytest.mark.netns

FORGED_IP_ID = 0x7C17        # marks the forged packets, to find them in the captures
WAIT = 20.0                  # bound on every wait: far beyond the client's first retransmission timeout


class Forger:
    """Client segments forged with scapy, sent from the client's namespace through a raw socket."""

    def __init__(self, h, client: socket.socket, state: repair.TcpState):
        self.h = h
        self.client = client
        self.cip, self.cport = client.getsockname()
        self.seq = state.rcv_seq            # the client's next sequence number, as the front end saw it
        self.ack = state.snd_seq            # what the client acknowledges: all the front end sent
        self.tsecr = state.timestamp
        self.raw = h.lab.socket("client", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sent: list[bytes] = []

    def segment(self, flags: str, seq: int, payload: bytes = b"") -> bytes:
        # The client's current TSval, read from its own socket, so that PAWS takes the segment.
        tsval = struct.unpack("=I", self.client.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, 4))[0]
        pkt = (IP(src=self.cip, dst=self.h.vip, id=FORGED_IP_ID, ttl=64)
               / TCP(sport=self.cport, dport=self.h.vport, seq=seq & 0xFFFFFFFF, ack=self.ack & 0xFFFFFFFF,
                     flags=flags, window=502, options=[("NOP", None), ("NOP", None),
                                                       ("Timestamp", (tsval, self.tsecr))]))
        if payload:
            pkt = pkt / payload
        return bytes(pkt)

    def send(self, packets: list[bytes]) -> None:
        for p in packets:
            self.raw.sendto(p, (self.h.vip, 0))
        self.sent += packets

    def close(self) -> None:
        self.raw.close()


def forged_frames(frames: list[bytes], to_mac: str) -> list[bytes]:
    """The forged packets among `frames` addressed to `to_mac` (on the front end's interface the capture
    also sees the steered copies leaving again, addressed to the back end)."""
    dst = bytes.fromhex(to_mac.replace(":", ""))
    return [f for f in frames if len(f) >= 34 and f[:6] == dst and f[12:14] == b"\x08\x00"
            and f[18:20] == struct.pack("!H", FORGED_IP_ID)]


def resets_from(frames: list[bytes], src_ip: str) -> list[bytes]:
    src = socket.inet_aton(src_ip)
    out = []
    for f in frames:
        if len(f) >= 34 and f[12:14] == b"\x08\x00" and f[23] == 6 and f[26:30] == src:
            ihl = (f[14] & 0x0F) * 4
            if f[14 + ihl + 13] & 0x04:
                out.append(f)
    return out


def inq(sock: socket.socket) -> int:
    return struct.unpack("=i", fcntl.ioctl(sock.fileno(), repair.SIOCINQ, bytes(4)))[0]


class Handoff:
    """One handoff driven step by step: freeze() ... steer(), with the client's packets in between."""

    def __init__(self, h, request: bytes, be: str = "be1"):
        self.h, self.request, self.be = h, request, be
        self.client = h.lab.connect("client", h.vip, h.vport, timeout=WAIT)
        self.conn = h.accept_request(self.client, request, timeout=WAIT)
        cip, cport = self.conn.getpeername()
        self.flow = FlowKey(cip, cport, h.vip, h.vport)
        self.be_sock: socket.socket | None = None
        self.state: repair.TcpState | None = None
        self.forger: Forger | None = None

    def freeze_and_dump(self) -> repair.TcpState:
        """Freeze and dump; from here on `forger` crafts client segments from the dumped state."""
        self.h.steering.freeze(self.flow)
        self.state = repair.dump(self.conn)
        assert self.state.recv_queue == self.request
        self.forger = Forger(self.h, self.client, self.state)
        return self.state

    def steer(self, *, announce: bool = True) -> socket.socket:
        # Nothing sent inside the window reached the front end's socket: all of it was dropped.
        assert inq(self.conn) == len(self.request)
        blob = self.state.to_bytes()
        self.be_sock = call_in_netns(self.h.lab.netns(self.be), repair.restore, repair.TcpState.from_bytes(blob),
                                     announce=announce)
        self.h.steering.forward(self.flow, self.h.lab.mac(self.be))
        repair.discard(self.conn)
        self.be_sock.settimeout(WAIT)
        return self.be_sock

    def close(self) -> None:
        if self.forger is not None:
            self.forger.close()
        self.client.close()
        if self.be_sock is not None:
            self.be_sock.close()
        self.h.steering.unforward(self.flow)


def frames_with_forged(h, captures, forged: int) -> dict[str, list[bytes]]:
    """Stop the captures; check that the forged packets were on the wire: the front end saw both rounds,
    the back end the second (steered to it), so the test is about a connection that really met them."""
    frames = {host: cap.stop() for host, cap in captures.items()}
    assert len(forged_frames(frames["fe"], h.lab.mac("fe"))) == 2 * forged
    assert len(forged_frames(frames["be1"], h.lab.mac("be1"))) == forged
    return frames


def assert_no_resets(h, frames: dict[str, list[bytes]]) -> None:
    for host in ("client", "fe", "be1"):
        assert resets_from(frames[host], h.vip) == [] and resets_from(frames[host], h.lab.ip("client")) == []


def recv_until_eof(sock: socket.socket, limit: int = 1 << 24) -> bytes:
    buf = bytearray()
    while len(buf) <= limit:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise AssertionError(f"more than {limit} bytes without an end")


@pytest.fixture
def captures(handoff_lab):
    caps = {host: handoff_lab.capture(host) for host in ("client", "fe", "be1")}
    try:
        yield caps
    finally:
        for cap in caps.values():
            cap.stop()


DATA_CASES = ["retransmitted", "out_of_order", "window_probe"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_forged_segments_in_the_freeze_window_leave_the_stream_exact(handoff_lab, captures, case):
    """While frozen, the client's own kernel sends part of the body (dropped, retransmitted later) and
    forged copies arrive: an old segment again, later bytes before earlier ones, a window probe. The
    back end reads exactly the bytes the client wrote, once, in order; the answer reaches the client."""
    h = handoff_lab
    head = b"PUT /adv HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    part1, part2 = os.urandom(3000), os.urandom(5000)
    request = head % (len(part1) + len(part2))
    ho = Handoff(h, request)
    client = ho.client
    try:
        state = ho.freeze_and_dump()
        forger = ho.forger
        seq = state.rcv_seq
        client.sendall(part1)                               # dropped by the freeze; the client retransmits
        if case == "retransmitted":                         # the request again (already received)
            forged = [forger.segment("PA", seq - len(request), request),
                      forger.segment("PA", seq - 20, request[-20:])]
        elif case == "out_of_order":                        # bytes beyond a hole, before the hole is filled
            forged = [forger.segment("PA", seq + len(part1) + 1000, part2[1000:2400]),
                      forger.segment("PA", seq + 1400, part1[1400:2800]),
                      forger.segment("PA", seq + len(part1), part2[:700])]
        else:                                               # what Linux sends as a zero-window probe
            forged = [forger.segment("A", seq - 1), forger.segment("A", seq - 1)]
        forger.send(forged)
        be_sock = ho.steer()
        forger.send(forged)                                 # delayed copies, now reaching the back end
        client.sendall(part2)
        got = h.recv_exact(be_sock, len(request) + len(part1) + len(part2))
        assert got[:len(request)] == request
        assert h.sha256(got[len(request):]) == h.sha256(part1 + part2)
        be_sock.sendall(h.http_response(b"stored exactly"))
        assert h.read_http_response(client)[1] == b"stored exactly"
        client.shutdown(socket.SHUT_WR)
        assert be_sock.recv(1) == b""                       # nothing more, and the client's FIN arrived
    finally:
        ho.close()
    frames = frames_with_forged(h, captures, len(forged))
    assert_no_resets(h, frames)


def test_client_fin_and_a_duplicate_in_the_freeze_window(handoff_lab, captures):
    """The client half-closes right after its request, while the flow is frozen (its FIN is dropped and
    retransmitted), and a forged copy of that FIN arrives too: the back end reads the request and then
    the end, answers, and the client gets the whole answer and the back end's FIN."""
    h = handoff_lab
    request = b"GET /fin HTTP/1.0\r\nHost: x\r\n\r\n"
    ho = Handoff(h, request)
    client = ho.client
    try:
        state = ho.freeze_and_dump()
        forger = ho.forger
        client.shutdown(socket.SHUT_WR)                     # the real FIN: dropped by the freeze
        forged = [forger.segment("FA", state.rcv_seq)]
        forger.send(forged)
        be_sock = ho.steer()
        forger.send(forged)
        assert recv_until_eof(be_sock) == request           # the request, then the FIN: exactly once
        body = os.urandom(200_000)
        be_sock.sendall(h.http_response(body))
        be_sock.shutdown(socket.SHUT_WR)
        head_body = h.read_http_response(client)
        assert h.sha256(head_body[1]) == h.sha256(body)
        assert client.recv(1) == b""
    finally:
        ho.close()
    frames = frames_with_forged(h, captures, len(forged))
    assert_no_resets(h, frames)


def test_forged_rst_in_the_freeze_window_then_at_the_back_end(handoff_lab, captures):
    """A RST with the exact sequence number: inside the window the freeze drops it (the connection goes
    on); its delayed copy reaches the restored socket and resets it. The reset is clean on both ends:
    the back end's socket reports ECONNRESET, the client's next segment draws the back end's RST, and
    the front end answers nothing (no socket of its own, no RST)."""
    h = handoff_lab
    request = b"GET /rst HTTP/1.1\r\nHost: x\r\n\r\n"
    ho = Handoff(h, request)
    client = ho.client
    try:
        state = ho.freeze_and_dump()
        forger = ho.forger
        forged = [forger.segment("R", state.rcv_seq)]
        forger.send(forged)
        # Inside the window the RST changed nothing: the front end's socket is still the connection.
        assert ho.conn.getsockopt(socket.IPPROTO_TCP, repair.TCP_INFO, 1)[0] == repair.TCP_ESTABLISHED
        be_sock = ho.steer()
        assert h.recv_exact(be_sock, len(request)) == request
        forger.send(forged)
        with pytest.raises(ConnectionResetError):
            be_sock.recv(1)                                 # bounded by the socket's timeout
        client.sendall(b"more")
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    finally:
        ho.close()
    frames = frames_with_forged(h, captures, len(forged))
    assert resets_from(frames["client"], h.vip)             # the back end reset the client's segment
    assert resets_from(frames["fe"], h.vip) == []           # ... and the front end sent none


def test_client_aborts_in_the_freeze_window(handoff_lab, captures):
    """The client resets the connection (SO_LINGER 0) while it is frozen: its RST is dropped and never
    retransmitted, so the restored socket believes in a live connection. Its first segment to the
    client draws the client's RST and the back end's socket ends with ECONNRESET: no hang."""
    h = handoff_lab
    request = b"GET /abort HTTP/1.1\r\nHost: x\r\n\r\n"
    ho = Handoff(h, request)
    client = ho.client
    try:
        ho.freeze_and_dump()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()                                      # the RST: dropped by the freeze
        be_sock = ho.steer()
        assert h.recv_exact(be_sock, len(request)) == request
        be_sock.sendall(h.http_response(b"nobody listens"))

        def reset() -> bool:
            try:
                return be_sock.recv(1) == b"" and False
            except ConnectionResetError:
                return True
        assert wait_until(reset, timeout=WAIT, what="the back end's socket reset by the client")
    finally:
        ho.close()
    frames = {host: cap.stop() for host, cap in captures.items()}
    assert len(resets_from(frames["client"], h.lab.ip("client"))) >= 2   # the abort, and the answer's RST
    assert resets_from(frames["be1"], h.lab.ip("client"))   # the second reached the back end directly


@pytest.mark.parametrize("announce_at_restore", [False, True])
def test_restored_socket_is_silent_until_announced(handoff_lab, captures, announce_at_restore):
    """restore(announce=False) sends nothing; repair.announce() then sends one window probe, which the
    client answers at once, and (the flow being steered) the answer reaches the back end. This is what
    tcpha-be does around Steered; restore's default still probes when repair goes off."""
    h = handoff_lab
    request = b"GET /quiet HTTP/1.1\r\nHost: x\r\n\r\n"
    ho = Handoff(h, request)
    try:
        ho.freeze_and_dump()
        be_sock = ho.steer(announce=announce_at_restore)
        repair.announce(be_sock)
        assert h.recv_exact(be_sock, len(request)) == request
        be_sock.sendall(h.http_response(b"after the probe"))
        assert h.read_http_response(ho.client)[1] == b"after the probe"
        cport = ho.client.getsockname()[1]
    finally:
        ho.close()
    frames = {host: cap.stop() for host, cap in captures.items()}
    at_client = [g for g in captures["client"].segments() if cport in (g.sport, g.dport)]
    probes = window_probes(at_client, h.vip, h.vport)
    assert len(probes) == (2 if announce_at_restore else 1)
    if announce_at_restore:
        # The client answers at most one out-of-window segment per net.ipv4.tcp_invalid_ratelimit
        # (500 ms): a probe at restore, whose answer the freeze may drop, would silence the next one.
        return
    probe = probes[0]
    reply = next(g for g in at_client if g.at >= probe.at and g.sport == cport and g.ack == (probe.seq + 1) & 0xFFFFFFFF)
    at_be = [tcp_segment(f) for f in frames["be1"]]
    assert any(g is not None and g.sport == cport and (g.seq, g.ack, g.flags) == (reply.seq, reply.ack, reply.flags)
               for g in at_be), "the client's answer to the announced probe did not reach the back end"
