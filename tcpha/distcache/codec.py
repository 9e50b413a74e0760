"""The distcache 1.4.x wire protocol (version 0x11), sans-I/O.

Nothing here touches a socket: :class:`MessageReader` is fed bytes and returns
whole :class:`Message` objects (or raises :class:`ProtocolError`), and
:func:`encode_message` turns a message into the bytes to write.  The rules are
those of the table in docs/distcache.md ("The protocol codec"), read from the
original 1.4.x source and checked against its binaries (tests/distcache/
transcripts); each check below names the rule it implements.

A frame (all integers big-endian, ``struct`` format ``>IBIBBBH``)::

    proto_level u32 | is_response u8 | request_uid u32 | op_class u8
    | operation u8 | complete u8 | data_len u16 | data[data_len]
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "PROTO_LEVEL", "FRAME_HEADER", "MAX_FRAME_DATA", "MAX_FRAMES", "MAX_MESSAGE",
    "MAX_ADD_TIMEOUT_MS", "MAX_ID_LEN", "MAX_DATA_LEN",
    "Op", "Status", "ProtocolError", "Message", "MessageReader",
    "encode_message", "encode_response", "encode_add_payload", "decode_add_payload",
    "check_add_payload", "AddRequest", "parse_single_request",
]

# Rule: "always sent as 0x00110000; a receiver accepts any 0x0011xxxx".
PROTO_LEVEL = 0x00110000
PROTO_MAJOR = 0x0011
FRAME_HEADER = struct.Struct(">IBIBBBH")
HEADER_LEN = FRAME_HEADER.size  # 14
# Rule: "data_len 0..2048"; "at most 16 frames (32768 bytes)".
MAX_FRAME_DATA = 2048
MAX_FRAMES = 16
MAX_MESSAGE = MAX_FRAME_DATA * MAX_FRAMES  # 32768
# ADD payload limits (server checks, see check_add_payload).
MAX_ADD_TIMEOUT_MS = 604800000  # one week
MAX_ID_LEN = 64
MAX_DATA_LEN = 32768
_ADD_HEAD = struct.Struct(">II")


class Op(enum.IntEnum):
    ADD = 0
    GET = 1
    REMOVE = 2
    HAVE = 3


class Status(enum.IntEnum):
    OK = 0
    NOTOK = 1
    DISCONNECTED = 2  # only the proxy (dc_client) sends it
    ADD_CORRUPT = 100
    ADD_MATCHING_SESSION = 101
    ADD_TIMEOUT_RANGE = 102
    ADD_ID_RANGE = 103
    ADD_DATA_RANGE = 104


class ProtocolError(Exception):
    """Corrupt frame, wrong direction, bad version or over-long message.

    The I/O loop that gets it closes that one connection without replying.
    ``reason`` is a short machine-friendly tag ('version', 'direction',
    'corrupt', 'too-long', 'interleaved').
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        # Whole messages decoded from the same feed() before the bad frame: a
        # server answers them (in order) before closing, as the C server would.
        self.messages: list[Message] = []


@dataclass(frozen=True, slots=True)
class Message:
    is_response: bool
    uid: int
    op: Op
    payload: bytes


_OPS = tuple(Op)  # index == wire value
_pack_header = FRAME_HEADER.pack
_unpack_header = FRAME_HEADER.unpack_from


def encode_response(uid: int, op: int, payload: bytes) -> bytes:
    """Fast path of :func:`encode_message` for a response (used by the server)."""
    n = len(payload)
    if n <= MAX_FRAME_DATA:
        return _pack_header(PROTO_LEVEL, 1, uid, 0, op, 1, n) + payload
    return _encode_frames(1, uid, op, payload)


def encode_message(msg: Message) -> bytes:
    """All frames of one message, concatenated (write them with one send).

    Rules: an empty payload is one frame with data_len 0 and complete 1; a
    longer payload is cut in 2048-byte frames, every non-final frame carries
    exactly 2048 bytes with complete 0; at most 16 frames; every frame repeats
    uid and operation; proto_level is always sent as 0x00110000.
    """
    op = int(msg.op)
    if not 0 <= op <= 3:
        raise ValueError(f"unknown operation {op}")
    if not 0 <= msg.uid <= 0xFFFFFFFF:
        raise ValueError(f"request uid {msg.uid} does not fit in 32 bits")
    payload = bytes(msg.payload)
    n = len(payload)
    if n <= MAX_FRAME_DATA:
        return _pack_header(PROTO_LEVEL, 1 if msg.is_response else 0, msg.uid, 0, op, 1, n) + payload
    return _encode_frames(1 if msg.is_response else 0, msg.uid, op, payload)


def _encode_frames(is_response: int, uid: int, op: int, payload: bytes) -> bytes:
    n = len(payload)
    if n > MAX_MESSAGE:
        raise ValueError(f"payload of {n} bytes exceeds the {MAX_MESSAGE}-byte message limit")
    parts = []
    for start in range(0, n, MAX_FRAME_DATA):
        chunk = payload[start:start + MAX_FRAME_DATA]
        last = start + MAX_FRAME_DATA >= n
        parts.append(_pack_header(PROTO_LEVEL, is_response, uid, 0, op, 1 if last else 0, len(chunk)))
        parts.append(chunk)
    return b"".join(parts)


def parse_single_request(data: bytes) -> tuple[int, int, bytes] | None:
    """Fast path for servers: ``(uid, op, payload)`` when ``data`` is exactly one whole
    single-frame request that passes every rule MessageReader checks (level 0x0011xxxx,
    is_response 0, op_class 0, op 0..3, complete 1, data_len <= 2048 and matching); None
    otherwise -- the caller then feeds ``data`` to its MessageReader, which decides.
    Only valid while that reader holds no partial data."""
    if len(data) < HEADER_LEN:
        return None
    level, is_resp, uid, op_class, op, complete, dlen = _unpack_header(data, 0)
    if (len(data) == HEADER_LEN + dlen and complete == 1 and level >> 16 == PROTO_MAJOR
            and is_resp == 0 and op_class == 0 and op <= 3 and dlen <= MAX_FRAME_DATA):
        return uid, op, data[HEADER_LEN:]
    return None


class MessageReader:
    """Sans-I/O decoder for one direction of one connection.

    ``expect_response=False`` for a server (accepts only requests), ``True`` for
    a client (accepts only responses).  :meth:`feed` returns the messages
    completed by the new bytes, in order; once it has raised ProtocolError the
    reader is dead (every later feed raises again).
    """

    __slots__ = ("_expect", "_buf", "_parts", "_part_len", "_uid", "_op", "_error")

    def __init__(self, *, expect_response: bool) -> None:
        self._expect = 1 if expect_response else 0
        self._buf = b""                  # unparsed bytes (less than one frame)
        self._parts: list[bytes] = []    # data of the frames of an unfinished message
        self._part_len = 0
        self._uid = 0
        self._op = 0
        self._error: ProtocolError | None = None

    def pending(self) -> int:
        """Bytes held that do not form a whole message yet (for stall/limit checks)."""
        return len(self._buf) + self._part_len + (HEADER_LEN * len(self._parts))

    def feed(self, data: bytes) -> list[Message]:
        if self._error is not None:
            raise ProtocolError(self._error.reason, f"stream already failed ({self._error})")
        if not self._buf and not self._parts and len(data) >= HEADER_LEN:
            # Fast path: exactly one whole single-frame message that passes every check below.
            level, is_resp, uid, op_class, op, complete, dlen = _unpack_header(data, 0)
            if (len(data) == HEADER_LEN + dlen and complete == 1 and level >> 16 == PROTO_MAJOR
                    and is_resp == self._expect and op_class == 0 and op <= 3
                    and dlen <= MAX_FRAME_DATA):
                return [Message(bool(is_resp), uid, _OPS[op], bytes(data[HEADER_LEN:]))]
        buf = self._buf + data if self._buf else data
        out: list[Message] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= HEADER_LEN:
                level, is_resp, uid, op_class, op, complete, dlen = _unpack_header(buf, pos)
                # Rule: a receiver accepts any 0x0011xxxx proto_level.
                if level >> 16 != PROTO_MAJOR:
                    raise ProtocolError("version", f"protocol level 0x{level:08x} is not 0x0011xxxx")
                # Rule: is_response is 0 (request) or 1 (response); anything else is corrupt.
                if is_resp != self._expect:
                    if is_resp > 1:
                        raise ProtocolError("corrupt", f"is_response byte {is_resp}")
                    raise ProtocolError(
                        "direction",
                        "response received where only requests are accepted" if is_resp
                        else "request received where only responses are accepted")
                # Rule: op_class must be 0.
                if op_class != 0:
                    raise ProtocolError("corrupt", f"op_class {op_class}")
                # Rule: ADD 0, GET 1, REMOVE 2, HAVE 3; anything else is corrupt.
                if op > 3:
                    raise ProtocolError("corrupt", f"unknown operation {op}")
                # Rule: complete is 1 on the last frame of a message, else 0.
                if complete > 1:
                    raise ProtocolError("corrupt", f"complete byte {complete}")
                # Rule: data_len 0..2048.
                if dlen > MAX_FRAME_DATA:
                    raise ProtocolError("corrupt", f"frame data_len {dlen} > {MAX_FRAME_DATA}")
                # Rule: every non-final frame carries exactly 2048 bytes.
                if not complete and dlen != MAX_FRAME_DATA:
                    raise ProtocolError("corrupt", f"non-final frame with data_len {dlen} != {MAX_FRAME_DATA}")
                if self._parts:
                    # Rule: continuation frames repeat uid and operation; messages never interleave.
                    if uid != self._uid or op != self._op:
                        raise ProtocolError("interleaved", "continuation frame with another uid or operation")
                elif not complete:
                    self._uid = uid
                    self._op = op
                # Rule: at most 16 frames (32768 bytes) per message.
                if not complete and len(self._parts) + 1 >= MAX_FRAMES:
                    raise ProtocolError("too-long", f"message longer than {MAX_FRAMES} frames")
                stop = pos + HEADER_LEN + dlen
                if stop > end:
                    break  # header valid, payload not all here yet
                chunk = buf[pos + HEADER_LEN:stop]
                pos = stop
                if complete:
                    if self._parts:
                        self._parts.append(chunk)
                        chunk = b"".join(self._parts)
                        self._parts = []
                        self._part_len = 0
                    out.append(Message(bool(is_resp), uid, _OPS[op], bytes(chunk)))
                else:
                    self._parts.append(chunk)
                    self._part_len += dlen
        except ProtocolError as exc:
            exc.messages = out
            self._error = exc
            self._buf = b""
            self._parts = []
            self._part_len = 0
            raise
        self._buf = bytes(buf[pos:]) if pos < end else b""
        return out


# --- ADD payload -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AddRequest:
    session_id: bytes
    data: bytes
    timeout_ms: int


def encode_add_payload(session_id: bytes, data: bytes, timeout_ms: int) -> bytes:
    """ADD request payload: u32 timeout (ms, relative), u32 id_len, id, data."""
    if not 0 <= timeout_ms <= 0xFFFFFFFF:
        raise ValueError(f"timeout {timeout_ms} ms does not fit in 32 bits")
    return _ADD_HEAD.pack(timeout_ms, len(session_id)) + bytes(session_id) + bytes(data)


def check_add_payload(payload: bytes) -> tuple[Status, bytes, bytes, int]:
    """The server's ADD payload checks, in the original's order.

    Returns ``(status, session_id, data, timeout_ms)``; only with Status.OK are
    the three fields meaningful (the store then decides OK or 101).  Raises
    ProtocolError when the payload is shorter than 8 bytes (rule: "close
    without reply").
    """
    n = len(payload)
    # Rule 1: payload < 8 bytes -> close without reply.
    if n < 8:
        raise ProtocolError("corrupt", f"ADD payload of {n} bytes (< 8)")
    timeout_ms, id_len = _ADD_HEAD.unpack_from(payload, 0)
    # Rule 2: timeout > 604800000 -> [102].
    if timeout_ms > MAX_ADD_TIMEOUT_MS:
        return Status.ADD_TIMEOUT_RANGE, b"", b"", 0
    # Rule 3: id_len >= remaining bytes (at least one data byte needed) -> [100].
    if id_len >= n - 8:
        return Status.ADD_CORRUPT, b"", b"", 0
    # Rule 4: id_len 0 or > 64 -> [103].
    if id_len == 0 or id_len > MAX_ID_LEN:
        return Status.ADD_ID_RANGE, b"", b"", 0
    # Rule 5: data > 32768 -> [104] (unreachable inside a 32768-byte message, kept for fidelity).
    if n - 8 - id_len > MAX_DATA_LEN:
        return Status.ADD_DATA_RANGE, b"", b"", 0
    sid = bytes(payload[8:8 + id_len])
    return Status.OK, sid, bytes(payload[8 + id_len:]), timeout_ms


def decode_add_payload(payload: bytes) -> AddRequest:
    """Parse an ADD payload without the server's range checks (for tools/snoopers).

    Raises ProtocolError if it is shorter than 8 bytes or id_len runs past the end.
    """
    if len(payload) < 8:
        raise ProtocolError("corrupt", f"ADD payload of {len(payload)} bytes (< 8)")
    timeout_ms, id_len = _ADD_HEAD.unpack_from(payload, 0)
    if 8 + id_len > len(payload):
        raise ProtocolError("corrupt", f"ADD id_len {id_len} runs past the payload")
    return AddRequest(bytes(payload[8:8 + id_len]), bytes(payload[8 + id_len:]), timeout_ms)
