"""Frames on a lab host's interface, captured in its namespace (AF_PACKET), and reading TCP out of them.

For tests that assert what went over the wire (resets, retransmissions, who answered) rather than how
long something took.
"""

from __future__ import annotations

import ctypes
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SOL_PACKET = 263
PACKET_STATISTICS = 6
SNAPLEN = 160                 # Ethernet + IPv4 + TCP headers with options, and the first payload bytes
CAPTURE_BUFFER = 64 << 20     # a 10 MB upload is a few hundred frames, but the reader is Python on a busy machine


@dataclass(frozen=True, slots=True)
class Segment:
    """One IPv4 TCP segment seen in a capture."""

    at: float          # time.monotonic() when the capture read it
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    ack: int
    flags: int
    window: int        # the raw field, unscaled
    length: int        # payload bytes
    ip_id: int = 0     # with seq, tells one transmission from its retransmissions (they get new ids)

    @property
    def end(self) -> int:
        return (self.seq + self.length) & 0xFFFFFFFF


def tcp_segment(frame: bytes, at: float = 0.0) -> Segment | None:
    """The TCP segment in an Ethernet frame, or None for anything else."""
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    t = 14 + ihl
    sport, dport, seq, ack = struct.unpack_from("!HHII", frame, t)
    doff = (frame[t + 12] >> 4) * 4
    return Segment(at, socket.inet_ntoa(frame[26:30]), sport, socket.inet_ntoa(frame[30:34]), dport, seq, ack,
                   frame[t + 13], struct.unpack_from("!H", frame, t + 14)[0], total - ihl - doff,
                   struct.unpack_from("!H", frame, 18)[0])


class FrameCapture:
    """Every frame seen on a host's LAN interface, captured with an AF_PACKET socket in its namespace."""

    def __init__(self, lab, host: str):
        self.sock = lab.socket(host, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        # Keep only the first SNAPLEN bytes of each frame (a one-instruction BPF program "accept SNAPLEN
        # bytes", as pcap's snaplen) and give the socket a large buffer: a capture that drops frames
        # would make the tests misjudge what went over the wire, so drops are counted (`drops`).
        program = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, SNAPLEN))   # BPF_RET|BPF_K
        self._program = program
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                             struct.pack("HL", 1, ctypes.addressof(program)))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_BUFFER)
        self.sock.bind((lab.ifname(host), ETH_P_ALL))
        self.drops = 0
        self.frames: list[bytes] = []
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                try:
                    self.frames.append(self.sock.recv(65535))
                except OSError:
                    return
                self.times.append(time.monotonic())

    def stop(self) -> list[bytes]:
        if self._stop.is_set():
            return self.frames
        self._stop.set()
        self._thread.join()
        # Frames already captured but not yet read by the thread belong to the capture too.
        self.sock.setblocking(False)
        try:
            while True:
                self.frames.append(self.sock.recv(65535))
                self.times.append(time.monotonic())
        except OSError:
            pass
        self.drops = struct.unpack("=II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]
        self.sock.close()
        return self.frames

    def segments(self) -> list[Segment]:
        out = []
        for frame, at in zip(self.frames, self.times):
            seg = tcp_segment(frame, at)
            if seg is not None:
                out.append(seg)
        return out

    def tcp_resets(self) -> list[bytes]:
        out = []
        for f in self.frames:
            if len(f) >= 34 and f[12:14] == b"\x08\x00" and f[23] == 6:
                ihl = (f[14] & 0x0F) * 4
                flags = f[14 + ihl + 13]
                if flags & 0x04:
                    out.append(f)
        return out


def retransmissions(segments: list[Segment], src: str, sport: int) -> list[Segment]:
    """The data segments from (src, sport) that carry bytes it had sent before (seq below the highest
    end seen so far): what its TCP retransmitted, by timeout, fast retransmit or loss probe."""
    out = []
    high: int | None = None
    for seg in segments:
        if seg.src != src or seg.sport != sport or seg.length == 0:
            continue
        if high is not None and (high - seg.seq) & 0xFFFFFFFF and ((high - seg.seq) & 0xFFFFFFFF) < 1 << 31:
            out.append(seg)
        if high is None or ((seg.end - high) & 0xFFFFFFFF) < 1 << 31:
            high = seg.end
    return out


def window_probes(segments: list[Segment], src: str, sport: int) -> list[Segment]:
    """Pure ACKs from (src, sport) carrying the sequence number one below the next it would send: the form
    of Linux's window probes (and keepalives), which the peer must answer at once."""
    out = []
    high: int | None = None
    for seg in segments:
        if seg.src != src or seg.sport != sport:
            continue
        if seg.length == 0 and seg.flags & 0x3F == 0x10 and high is not None and seg.seq == (high - 1) & 0xFFFFFFFF:
            out.append(seg)
        end = (seg.seq + seg.length + (1 if seg.flags & 0x03 else 0)) & 0xFFFFFFFF   # SYN, FIN count one
        if high is None or ((end - high) & 0xFFFFFFFF) < 1 << 31:
            high = end
    return out
