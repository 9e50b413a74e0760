"""Moving a live TCP connection between hosts with TCP_REPAIR: a small soccr-like API, no policy.

Hand-written on the raw socket options because no maintained Python library wraps TCP_REPAIR (CRIU's
libsoccr is C and GPL; we do not copy it). The sequence and its pitfalls are the ones recorded in
docs/kernel.md, all verified on this kernel. Every TCP_REPAIR switch of tcpha happens in this module.

    state = dump(sock)           # FE, after the flow's packets are frozen; sock stays in repair mode
    blob = state.to_bytes()      # travels over the control channel
    new = restore(TcpState.from_bytes(blob))   # BE: an ESTABLISHED socket owning the same 4-tuple
    discard(sock)                # FE, after the BE said "restored": close the dumped socket, no FIN/RST
    resume(sock)                 # FE, if the BE refused: repair off, the FE still owns the connection
    announce(sock)               # BE, once the flow is steered to it: the client answers at once
    silence(sock)                # BE, a live socket whose connection it gives up on: repair on for good,
                                 # so that closing it sends no FIN or RST (the client is elsewhere)

The names follow CRIU's libsoccr where it has the step: dump (its pause + save), restore, and resume
(repair off: the connection goes on from this host). soccr's "release" (drop the handle, the socket stays
in repair mode) has no function here: closing a dumped socket is discard(); silence() puts a live one
back into repair mode first.

Only ESTABLISHED connections can be moved: a socket in any other state makes dump() raise RepairError
(and leaves it out of repair mode, as it was).
"""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass, replace

__all__ = [
    "RepairError",
    "TcpState",
    "dump",
    "resume",
    "discard",
    "silence",
    "restore",
    "announce",
]

# Socket options and ioctls (linux/tcp.h, linux/sockios.h); none are exported by Python's socket module.
TCP_INFO = 11
TCP_MAXSEG = 2
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
IP_FREEBIND = 15
MAX_USER_MSS = 32767

TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0  # off, and the kernel sends a window probe (an ACK) to get the peer talking again
TCP_REPAIR_OFF_NO_WP = -1

TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8

# tcp_info.tcpi_options bits
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B

TCP_ESTABLISHED = 1
_TCP_STATE_NAMES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}

# Large queues are refilled in pieces: one send() of a big buffer in repair mode asks the kernel for one
# linear skb, which fails with ENOMEM beyond a few hundred KiB (seen).
QUEUE_CHUNK = 64 * 1024
# Queues up to this size fit the default socket buffers; larger ones get buffers sized for them.
BUFFER_SLACK = 64 * 1024
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
DUMP_ATTEMPTS = 4

_U32 = struct.Struct("=I")  # socket option values are host order
_INT = struct.Struct("=i")
_WINDOW = struct.Struct("=5I")  # struct tcp_repair_window
_TCPI_HEAD = struct.Struct("=7B")  # state, ca_state, retransmits, probes, backoff, options, wscales
_IOCTL_BUF = bytes(4)
_U32_MASK = 0xFFFFFFFF

# Wire format of TcpState.to_bytes (network byte order):
#   version, family(4|6), flags, snd_wscale, rcv_wscale, mss,
#   local ip (16 bytes, IPv4 in the first 4), local port, peer ip (16), peer port,
#   snd_seq, rcv_seq, timestamp, snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup,
#   unsent bytes, recv queue length, send queue length; then the two queues.
STATE_VERSION = 1
_HEADER = struct.Struct("!BBBBBH16sH16sH8I3I")
_F_TIMESTAMPS = 1
_F_SACK = 2
_F_WSCALE = 4
_F_WINDOW = 8


class RepairError(OSError):
    """A repair step failed; str(e) names the step."""

    def __str__(self) -> str:
        return str(self.strerror)



@dataclass(slots=True)
class TcpState:
    """Everything needed to rebuild one established TCP connection elsewhere."""

    family: int  # socket.AF_INET or socket.AF_INET6
    local: tuple[str, int]  # the server side: (VIP, port)
    peer: tuple[str, int]  # the client
    snd_seq: int  # write_seq: sequence number after the last byte in the send queue
    rcv_seq: int  # rcv_nxt: sequence number after the last byte in the receive queue
    mss: int
    recv_queue: bytes = b""  # received, not yet read by the application (e.g. the peeked request)
    send_queue: bytes = b""  # written by the application, not yet acknowledged by the peer
    unsent: int = 0  # how many bytes at the end of send_queue were never transmitted
    timestamps: bool = False
    sack: bool = False
    wscale: bool = False
    snd_wscale: int = 0
    rcv_wscale: int = 0
    timestamp: int = 0  # TCP_TIMESTAMP value at dump time (restores the per-connection offset)
    window: tuple[int, int, int, int, int] | None = None  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup

    def with_unread(self, data: bytes) -> TcpState:
        """The same connection with `data` put back in front of its receive queue: bytes a relay read off
        the socket and did not deliver (the request a back end holds when it moves a keep-alive connection,
        docs/kernel.md "Moving a keep-alive connection"). They must be exactly the bytes that came before
        the queue: restore() places the queue at rcv_seq - len(recv_queue)."""
        return replace(self, recv_queue=bytes(data) + self.recv_queue)

    def to_bytes(self) -> bytes:
        flags = (
            (_F_TIMESTAMPS if self.timestamps else 0)
            | (_F_SACK if self.sack else 0)
            | (_F_WSCALE if self.wscale else 0)
            | (_F_WINDOW if self.window is not None else 0)
        )
        window = self.window if self.window is not None else (0, 0, 0, 0, 0)
        try:
            head = _HEADER.pack(
                STATE_VERSION,
                4 if self.family == socket.AF_INET else 6,
                flags,
                self.snd_wscale,
                self.rcv_wscale,
                self.mss,
                _ip_bytes(self.family, self.local[0]),
                self.local[1],
                _ip_bytes(self.family, self.peer[0]),
                self.peer[1],
                self.snd_seq & _U32_MASK,
                self.rcv_seq & _U32_MASK,
                self.timestamp & _U32_MASK,
                *window,
                self.unsent,
                len(self.recv_queue),
                len(self.send_queue),
            )
        except (struct.error, ValueError) as exc:
            raise ValueError(f"TcpState cannot be encoded: {exc}") from None
        return b"".join((head, self.recv_queue, self.send_queue))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> TcpState:
        data = memoryview(data)
        if len(data) < _HEADER.size:
            raise ValueError(f"TCP state too short: {len(data)} bytes, need at least {_HEADER.size}")
        (version, fam, flags, snd_ws, rcv_ws, mss, lip, lport, pip, pport, snd_seq, rcv_seq, ts,
         w1, w2, w3, w4, w5, unsent, rlen, slen) = _HEADER.unpack_from(data)
        if version != STATE_VERSION:
            raise ValueError(f"TCP state version {version} not supported (this side speaks {STATE_VERSION})")
        if fam not in (4, 6):
            raise ValueError(f"TCP state has unknown address family {fam}")
        if len(data) != _HEADER.size + rlen + slen:
            raise ValueError(
                f"TCP state length {len(data)} does not match its queues ({_HEADER.size}+{rlen}+{slen})"
            )
        if unsent > slen:
            raise ValueError(f"TCP state claims {unsent} unsent bytes in a {slen}-byte send queue")
        if snd_ws > 14 or rcv_ws > 14:
            raise ValueError("TCP state has a window scale above 14")
        family = socket.AF_INET if fam == 4 else socket.AF_INET6
        body = _HEADER.size
        return cls(
            family=family,
            local=(_ip_text(family, lip), lport),
            peer=(_ip_text(family, pip), pport),
            snd_seq=snd_seq,
            rcv_seq=rcv_seq,
            mss=mss,
            recv_queue=bytes(data[body:body + rlen]),
            send_queue=bytes(data[body + rlen:body + rlen + slen]),
            unsent=unsent,
            timestamps=bool(flags & _F_TIMESTAMPS),
            sack=bool(flags & _F_SACK),
            wscale=bool(flags & _F_WSCALE),
            snd_wscale=snd_ws,
            rcv_wscale=rcv_ws,
            timestamp=ts,
            window=(w1, w2, w3, w4, w5) if flags & _F_WINDOW else None,
        )


def _ip_bytes(family: int, ip: str) -> bytes:
    packed = socket.inet_pton(family, ip)
    return packed.ljust(16, b"\0")


def _ip_text(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[:4])
    return socket.inet_ntop(family, raw)


def dump(sock: socket.socket, *, local: tuple[str, int] | None = None,
         peer: tuple[str, int] | None = None) -> TcpState:
    """Read the state of an ESTABLISHED connection; the socket is left in repair mode.

    Call it only after the flow's incoming packets are stopped (frozen): a segment that the socket
    accepted after its queues were read would be acknowledged to the client and lost. `local` and
    `peer`: the connection's addresses when the caller knows them already (accept() gave the peer, the
    listener's address is the local one), else they are asked of the socket.
    """
    fd = sock.fileno()
    info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCPI_HEAD.size)
    state, _ca, _retr, _probes, _backoff, options, wscales = _TCPI_HEAD.unpack_from(info)
    if state != TCP_ESTABLISHED:
        raise RepairError(0, f"cannot move a connection in state {_TCP_STATE_NAMES.get(state, state)}")
    setsockopt = sock.setsockopt
    getsockopt = sock.getsockopt
    tcp = socket.IPPROTO_TCP
    try:
        setsockopt(tcp, TCP_REPAIR, TCP_REPAIR_ON)
    except OSError as exc:
        raise RepairError(exc.errno, f"TCP_REPAIR on: {exc.strerror} (needs CAP_NET_ADMIN)") from None
    try:
        # Select the send queue at once and leave it selected: while a repaired socket has the send queue
        # selected, the kernel marks new data as sent without transmitting it. Otherwise a loss-probe or
        # retransmission timer firing during or after the dump (the socket's timers keep running, and the
        # client's ACKs are being dropped) puts new bytes on the wire that the dumped state says were never
        # sent: the client then ACKs beyond the restored socket's snd_nxt and the connection stalls (seen).
        setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        mss = getsockopt(tcp, TCP_MAXSEG)  # in repair mode: the negotiated clamp, not the current mss
        timestamp = _U32.unpack(getsockopt(tcp, TCP_TIMESTAMP, 4))[0]
        peek = socket.MSG_PEEK | socket.MSG_DONTWAIT
        # A segment that passed the freeze just before it took effect may still be processed during the
        # dump (repair mode does not stop reception), and an ACK may shrink the send queue: read until two
        # looks at the queue lengths agree with what was read in between.
        # (the ioctls called directly, without a helper per call: the dump is on every handoff's path)
        ioctl, buf, unpack = fcntl.ioctl, _IOCTL_BUF, _INT.unpack
        for _attempt in range(DUMP_ATTEMPTS):
            inq = unpack(ioctl(fd, SIOCINQ, buf))[0]
            outq = unpack(ioctl(fd, SIOCOUTQ, buf))[0]
            unsent = unpack(ioctl(fd, SIOCOUTQNSD, buf))[0]
            snd_seq = _U32.unpack(getsockopt(tcp, TCP_QUEUE_SEQ, 4))[0]  # send queue selected
            send_queue = sock.recv(outq, peek) if outq else b""
            setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            rcv_seq = _U32.unpack(getsockopt(tcp, TCP_QUEUE_SEQ, 4))[0]
            recv_queue = sock.recv(inq, peek) if inq else b""
            setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)  # see above: nothing new leaves from now on
            try:
                window = _WINDOW.unpack(getsockopt(tcp, TCP_REPAIR_WINDOW, _WINDOW.size))
            except OSError:
                window = None  # kernel without TCP_REPAIR_WINDOW (< 4.8): the peer re-advertises it
            if (len(recv_queue) == inq and len(send_queue) == outq
                    and unpack(ioctl(fd, SIOCINQ, buf))[0] == inq
                    and unpack(ioctl(fd, SIOCOUTQ, buf))[0] == outq
                    and unpack(ioctl(fd, SIOCOUTQNSD, buf))[0] == unsent):
                break
        else:
            raise RepairError(0, "the connection's queues kept changing during the dump "
                                 "(packets still reaching the socket: is the flow frozen?)")
        if local is None:
            local = sock.getsockname()
        if peer is None:
            peer = sock.getpeername()
    except RepairError:
        _repair_off(sock)
        raise
    except OSError as exc:
        _repair_off(sock)
        raise RepairError(exc.errno, f"dump: {exc.strerror}") from None
    return TcpState(
        family=sock.family,
        local=(local[0], local[1]),
        peer=(peer[0], peer[1]),
        snd_seq=snd_seq,
        rcv_seq=rcv_seq,
        mss=mss,
        recv_queue=recv_queue,
        send_queue=send_queue,
        unsent=unsent,
        timestamps=bool(options & TCPI_OPT_TIMESTAMPS),
        sack=bool(options & TCPI_OPT_SACK),
        wscale=bool(options & TCPI_OPT_WSCALE),
        snd_wscale=wscales & 0x0F,
        rcv_wscale=wscales >> 4,
        timestamp=timestamp,
        window=window,
    )


def received_since(sock: socket.socket, state: TcpState) -> int:
    """Bytes `sock` took in after `state` was dumped from it (0: none).

    A dumped socket stays in repair mode, and repair mode does not stop reception: a segment that
    passed the freeze just before it took effect is still queued, and acknowledged to the peer, after
    the dump read the queues. Every copy restored from `state` lacks those bytes, and the peer, which
    has had them acknowledged, never sends them again. The caller checks before it steers the flow
    away. The dumped socket's queue is only ever peeked, so its length now minus the dumped queue's
    is what came since."""
    return _INT.unpack(fcntl.ioctl(sock.fileno(), SIOCINQ, _IOCTL_BUF))[0] - len(state.recv_queue)


def _leave_repair(sock: socket.socket, mode: int = TCP_REPAIR_OFF) -> None:
    """Repair mode off, then SO_REUSEADDR on again. Every switch off in tcpha goes through here.

    Switching repair off sets the socket's reuse to "none" (do_tcp_setsockopt, TCP_REPAIR: sk_reuse =
    SK_NO_REUSE), whatever it was before. Every socket tcpha moves had SO_REUSEADDR: accepted from a
    listener that has it, or restored with it. Left at "none", the connection, and its TIME_WAIT for a
    minute after it ends, makes every later bind() of its local address and port fail with EADDRINUSE,
    SO_REUSEADDR or not (inet_bind_conflict): a front end restarted after kill -9 could not listen on
    the VIP while a connection it had taken back was in TIME_WAIT (seen in the soak), nor could a back
    end's application restart on the VIP:port of a restored connection."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, mode)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def _repair_off(sock: socket.socket) -> None:
    try:
        _leave_repair(sock)
    except OSError:
        pass


def resume(sock: socket.socket) -> None:
    """Take a dumped socket out of repair mode: the connection goes on from this host (rollback; what
    soccr calls resume)."""
    try:
        _leave_repair(sock)
    except OSError as exc:
        raise RepairError(exc.errno, f"TCP_REPAIR off: {exc.strerror}") from None


def discard(sock: socket.socket) -> None:
    """Close a dumped socket silently: in repair mode the kernel sends no FIN or RST and keeps no TIME_WAIT.
    For a socket not in repair mode, silence() it first."""
    sock.close()


def silence(sock: socket.socket) -> None:
    """Put a live socket into repair mode for good: from now on it sends nothing, and closing it sends no
    FIN or RST and leaves no TIME_WAIT. For a connection that lives on elsewhere (or that its peer has
    already replaced): its last owner must not disturb it. Needs CAP_NET_ADMIN, like every repair step.

    Not needed for a dumped socket, and not done to one: it is in repair mode already, and switching
    repair on again would undo dump()'s selection of the send queue (see dump())."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    except OSError as exc:
        raise RepairError(exc.errno, f"TCP_REPAIR on: {exc.strerror}") from None


def restore(state: TcpState, *, freebind: bool = True, announce: bool = True) -> socket.socket:
    """Rebuild the connection described by `state` on this host and return the ESTABLISHED socket.

    No packet is sent until the end, when repair mode is switched off: with `announce`, a window probe
    (see announce()); without, nothing (the caller announces the socket once the peer's packets reach
    it: a probe sent while the flow is still frozen elsewhere draws an answer that is dropped there).
    Never-transmitted bytes of the send queue are sent at once either way. The local address (the VIP)
    need not be configured when `freebind` is set; for replies to leave with it as source it normally is
    (on lo, on a back end).
    """
    tcp = socket.IPPROTO_TCP
    sock = socket.socket(state.family, socket.SOCK_STREAM)
    setsockopt = sock.setsockopt
    step = "socket"
    try:
        # SO_REUSEADDR before TCP_REPAIR: TCP_REPAIR makes the socket's reuse "forced"; setting
        # SO_REUSEADDR afterwards overwrites that and bind() fails with EADDRINUSE as soon as a second
        # restored connection holds the same VIP:port.
        step = "SO_REUSEADDR"
        setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        step = "TCP_REPAIR on"
        setsockopt(tcp, TCP_REPAIR, TCP_REPAIR_ON)
        # Queue sequence numbers, only settable while CLOSED. The kernel advances them again as the queues
        # are refilled below, so set them to where the queues *start*.
        step = "receive queue seq"
        setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        setsockopt(tcp, TCP_QUEUE_SEQ, _U32.pack((state.rcv_seq - len(state.recv_queue)) & _U32_MASK))
        step = "send queue seq"
        setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        setsockopt(tcp, TCP_QUEUE_SEQ, _U32.pack((state.snd_seq - len(state.send_queue)) & _U32_MASK))
        # The MSS clamp before connect(): connect sizes the socket's segments from it, and setting it later
        # through TCP_REPAIR_OPTIONS alone leaves the socket sending 536-byte segments (seen).
        # TCP_MAXSEG takes at most 32767 (MAX_TCP_WINDOW): only loopback MSSes are larger.
        step = "TCP_MAXSEG"
        setsockopt(tcp, TCP_MAXSEG, min(state.mss, MAX_USER_MSS))
        if freebind:
            step = "IP_FREEBIND"
            setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        step = f"bind {state.local[0]}:{state.local[1]}"
        sock.bind(state.local)
        step = f"connect {state.peer[0]}:{state.peer[1]}"
        sock.connect(state.peer)  # repair mode: no SYN, straight to ESTABLISHED
        step = "TCP_REPAIR_OPTIONS"
        setsockopt(tcp, TCP_REPAIR_OPTIONS, _repair_options(state))
        if state.timestamps:
            step = "TCP_TIMESTAMP"
            setsockopt(tcp, TCP_TIMESTAMP, _U32.pack(state.timestamp & _U32_MASK))
        # A queue larger than the socket's buffer would block its refill for ever (nothing drains a
        # repaired socket's queues): a connection moved between back ends after a large response carries
        # megabytes of unacknowledged data. Sized before the refill; FORCE: beyond wmem_max/rmem_max.
        if len(state.send_queue) > BUFFER_SLACK:
            step = "SO_SNDBUFFORCE"
            setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * len(state.send_queue) + BUFFER_SLACK)
        if len(state.recv_queue) > BUFFER_SLACK:
            step = "SO_RCVBUFFORCE"
            setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 2 * len(state.recv_queue) + BUFFER_SLACK)
        if state.recv_queue:
            step = "receive queue refill"
            setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            _send_chunked(sock, state.recv_queue)
        sent_len = len(state.send_queue) - state.unsent
        if sent_len:
            step = "send queue refill"
            setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            _send_chunked(sock, memoryview(state.send_queue)[:sent_len])
        setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        if state.window is not None:
            # After the queues: the kernel refuses rcv_wup > rcv_nxt, and rcv_nxt only reaches its final
            # value once the receive queue is refilled.
            step = "TCP_REPAIR_WINDOW"
            setsockopt(tcp, TCP_REPAIR_WINDOW, _WINDOW.pack(*state.window))
        step = "TCP_REPAIR off"
        _leave_repair(sock, TCP_REPAIR_OFF if announce else TCP_REPAIR_OFF_NO_WP)
        if state.unsent:
            # Bytes never transmitted are simply sent as new data now that the connection is live.
            step = "unsent data"
            sock.sendall(memoryview(state.send_queue)[sent_len:])
    except OSError as exc:
        sock.close()  # still in repair mode unless the last steps failed: silent
        raise RepairError(exc.errno, f"restore {state.peer[0]}:{state.peer[1]}: {step}: {exc.strerror}") from None
    return sock


def announce(sock: socket.socket) -> None:
    """Make the peer of a live connection answer at once: repair mode on and off again, which sends a
    window probe (an ACK one below the peer's window, carrying our current receive window). The peer
    replies with an immediate ACK, and a peer that was waiting for our window to open (persist mode,
    its timer backed off) sends at once. Needs CAP_NET_ADMIN, like every repair step."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        _leave_repair(sock)
    except OSError as exc:
        raise RepairError(exc.errno, f"window probe: {exc.strerror}") from None


def _repair_options(state: TcpState) -> bytes:
    opts = [TCPOPT_MSS, state.mss]
    if state.wscale:
        opts += (TCPOPT_WINDOW, state.snd_wscale | (state.rcv_wscale << 16))
    if state.sack:
        opts += (TCPOPT_SACK_PERM, 0)
    if state.timestamps:
        opts += (TCPOPT_TIMESTAMP, 0)
    return struct.pack(f"={len(opts)}I", *opts)


def _send_chunked(sock: socket.socket, data: bytes | memoryview) -> None:
    view = memoryview(data)
    for start in range(0, len(view), QUEUE_CHUNK):
        chunk = view[start:start + QUEUE_CHUNK]
        while chunk:
            n = sock.send(chunk)
            chunk = chunk[n:]

