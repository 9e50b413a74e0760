"""The FE<->BE control channel, sans-I/O (h11 style): bytes in, messages out; no sockets here.

Why hand-written: no maintained library offers an authenticated message framing over an
existing TCP stream with a pre-shared key and no certificates (TLS-PSK is not reachable from
Python's ssl module); the construction below is a few lines of stdlib ``hmac``.

Frame (every frame, both directions)::

    u32  length      bytes that follow (header + payload + mac), big-endian
    u8   version     1
    u8   type        message type (tcpha.control.messages)
    u64  seq         0 for Hello, then 1, 2, 3, ... per direction
    ...  payload     the message's fields
    32   mac         HMAC-SHA256(k, length | header | payload)

Rules implemented (each cited where it is checked):

R1  Every frame carries an HMAC-SHA256 under a key derived from the shared authkey; a frame
    whose MAC does not verify is an error before its payload is even decoded.
R2  Each side opens with a Hello carrying 16 fresh random bytes (its nonce). The Hello's MAC
    key is derived from the authkey and the sender's role only: a wrong key shows at once.
R3  Every later frame is MAC'd with ``k = HMAC(authkey, "tcpha-control/1 data" | sender role |
    sender nonce | receiver nonce)``: a frame recorded on another connection (even a whole
    recorded session, Hello included) does not verify under the receiver's fresh nonce, and a
    frame reflected back to its sender does not verify under the other direction's key.
R4  Sequence numbers are strictly consecutive per direction (0 for Hello, then 1, 2, ...) and
    covered by the MAC: a frame replayed, reordered or dropped within a connection is refused.
R5  A frame longer than ``max_message`` (``HELLO_MAX`` before the peer's Hello verified) is
    refused as soon as its length prefix is read, so an unauthenticated peer cannot make the
    receiver buffer more than HELLO_MAX bytes before a Hello verified. (A replayed Hello gets a
    peer to max_message per connection at most, and never further than the MAC check.)
R6  A message the peer's role may not send (a Handoff from a back end, a second Hello, a
    peer claiming our own role or echoing our nonce) is refused.
R7  After the first error the connection is dead: feed() raises again; the I/O loop logs the
    one-line reason and closes the socket.

A Hello proves nothing by itself (it may be a replay); ``authenticated`` becomes True with the
first verified frame after it. Nothing a peer asks for (a Handoff) can arrive before that,
because every such frame is checked against R3 and R4 first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import struct
from typing import Any

from tcpha.control.messages import SENDERS, Hello, PayloadError, decode_payload, encode_payload

__all__ = ["ControlError", "ControlConnection", "VERSION", "HELLO_MAX", "DEFAULT_MAX_MESSAGE",
           "MAC_SIZE", "NONCE_SIZE"]

VERSION = 1
MAC_SIZE = 32
NONCE_SIZE = 16
HELLO_MAX = 4096
# A Handoff carries the socket's queues: the receive queue is bounded by tcp_rmem (6 MiB by
# default), the send queue by tcp_wmem (4 MiB); 16 MiB leaves room for raised limits.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BBQ")          # version, type, seq
_LENGTH_HEADER = struct.Struct(">IBBQ")  # both at once
_MIN_FRAME = _HEADER.size + MAC_SIZE      # the length field's smallest valid value
_LABEL_HELLO = b"tcpha-control/1 hello "
_LABEL_DATA = b"tcpha-control/1 data "
_ROLES = ("fe", "be")


class ControlError(Exception):
    """A frame that must not be acted on: bad MAC, replay, malformed, oversize, wrong sender.

    str(e) is one line, for the log; the connection is unusable afterwards (R7).
    """


def _derive(key: bytes, *parts: bytes) -> bytes:
    return hmac.digest(key, b"".join(parts), "sha256")


class _MacKey:
    """HMAC-SHA256 under one key (RFC 2104, through the standard library's hmac).

    The keyed state is set up once per key and copied per frame: on the handoff path (four frames a
    handoff) that costs about half of ``hmac.digest``, which sets the key up again each time."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        self._base = hmac.new(key, digestmod=hashlib.sha256)

    def digest(self, data: bytes | memoryview) -> bytes:
        h = self._base.copy()
        h.update(data)
        return h.digest()


def _mac(key: _MacKey, *parts: bytes | memoryview) -> bytes:
    return key.digest(parts[0] if len(parts) == 1 else b"".join(parts))


class ControlConnection:
    """One control connection, either side. Not thread-safe (one per socket, one I/O loop).

    Usage (both sides, right after connect/accept)::

        conn = ControlConnection(key, role="fe")
        sock.sendall(conn.send(Hello(node_id="fe1", addr="10.77.0.10")))   # role, nonce filled in
        for msg in conn.feed(sock.recv(65536)):    # first: the peer's Hello
            ...
        sock.sendall(conn.send(Handoff(...)))      # allowed once the peer's Hello arrived

    ``send`` raises RuntimeError when called out of order (data before both Hellos), ValueError
    (PayloadError) for a message that cannot be encoded or is larger than ``max_message``.
    ``feed`` raises ControlError for anything that must not be acted on.
    """

    def __init__(self, key: bytes, *, role: str, max_message: int = DEFAULT_MAX_MESSAGE,
                 nonce: bytes | None = None) -> None:
        if role not in _ROLES:
            raise ValueError(f"role must be 'fe' or 'be', not {role!r}")
        if not key:
            raise ValueError("empty control key")
        self.role = role
        self.peer_role = "be" if role == "fe" else "fe"
        self.max_message = max_message
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self.peer_hello: Hello | None = None
        self.authenticated = False          # True once a frame bound to both nonces verified
        self._key = key
        self._hello_send_key = _MacKey(_derive(key, _LABEL_HELLO, role.encode()))
        self._hello_recv_key = _MacKey(_derive(key, _LABEL_HELLO, self.peer_role.encode()))
        self._send_key: _MacKey | None = None       # the MAC keys of R3, once the peer's Hello arrived
        self._recv_key: _MacKey | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self._hello_sent = False
        self._buffer = bytearray()
        self._error: str | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Both Hellos exchanged: any message may be sent."""
        return self._hello_sent and self.peer_hello is not None

    def pending(self) -> int:
        """Bytes received but not yet a whole frame."""
        return len(self._buffer)

    # -- sending ----------------------------------------------------------------------------

    def send(self, msg: Any) -> bytes:
        """The frame to write for ``msg`` (framed, sequence-numbered, MAC'd)."""
        if self._error is not None:
            raise RuntimeError(f"control connection failed earlier: {self._error}")
        if isinstance(msg, Hello):
            if self._hello_sent:
                raise RuntimeError("Hello already sent on this connection")
            if msg.role not in ("", self.role) or msg.nonce not in (b"", self.nonce):
                raise ValueError("a Hello's role and nonce are the connection's own")
            msg = dataclasses.replace(msg, role=self.role, nonce=self.nonce)
            frame = self._frame(msg, self._hello_send_key, HELLO_MAX)
            self._hello_sent = True
            return frame
        if not self._hello_sent:
            raise RuntimeError("send a Hello first")
        if self._send_key is None:
            raise RuntimeError("the peer's Hello has not arrived yet")
        if self.role not in SENDERS[type(msg)]:
            raise ValueError(f"a {self.role} does not send {type(msg).__name__}")
        return self._frame(msg, self._send_key, self.max_message)

    def _frame(self, msg: Any, key: _MacKey, limit: int) -> bytes:
        payload = encode_payload(msg)
        length = _HEADER.size + len(payload) + MAC_SIZE
        if length > limit:
            raise PayloadError(f"{type(msg).__name__} of {length} bytes exceeds the {limit}-byte limit")
        body = _LENGTH_HEADER.pack(length, VERSION, msg.TYPE, self._send_seq) + payload
        self._send_seq += 1
        return body + key.digest(body)

    # -- receiving --------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Any]:
        """Messages completed by ``data``, in order; ControlError if any frame is bad.

        Messages before a bad frame in the same ``data`` are not returned either: the caller
        drops the connection on ControlError (R7), so nothing from it is acted on.
        ``feed(b"")`` means the peer closed the connection (as in h11): ControlError if that
        leaves a frame half-received.
        """
        if self._error is not None:
            raise ControlError(f"control connection failed earlier: {self._error}")
        if not data:
            if self._buffer:
                self._error = f"connection closed in the middle of a frame ({len(self._buffer)} bytes)"
                self._buffer.clear()
                raise ControlError(self._error)
            return []
        try:
            return self._feed(data)
        except ControlError as exc:
            self._error = str(exc)
            self._buffer.clear()
            raise

    def _feed(self, data: bytes) -> list[Any]:
        buf = self._buffer
        buf += data
        messages: list[Any] = []
        size = len(buf)
        pos = 0           # the frames of one read are cut out by position, and removed from buf at once
        try:
            while size - pos >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buf, pos)
                limit = self.max_message if self.peer_hello is not None else HELLO_MAX
                if length > limit:  # R5: refuse before buffering
                    raise ControlError(f"frame of {length} bytes exceeds the {limit}-byte limit")
                if length < _MIN_FRAME:
                    raise ControlError(f"frame of {length} bytes is shorter than a header and MAC")
                end = pos + _LENGTH.size + length
                if size < end:
                    break
                # A copy, not a view: a view kept alive by an exception's traceback would pin the
                # bytearray (BufferError on resize).
                frame = bytes(buf[pos:end])
                pos = end
                messages.append(self._open(frame))
        finally:
            del buf[:pos]
        return messages

    def _open(self, frame: bytes) -> Any:
        body_end = len(frame) - MAC_SIZE
        version, type_code, seq = _HEADER.unpack_from(frame, _LENGTH.size)
        first = self.peer_hello is None
        key = self._hello_recv_key if first else self._recv_key
        assert key is not None
        expected = key.digest(memoryview(frame)[:body_end])
        if not hmac.compare_digest(expected, frame[body_end:]):  # R1 (R2 for a Hello, R3 after)
            if first:
                raise ControlError("bad MAC on the peer's Hello (wrong authkey, or not a tcpha peer)")
            raise ControlError(f"bad MAC on frame {seq} (forged, corrupted or from another connection)")
        if version != VERSION:
            raise ControlError(f"unsupported control protocol version {version}")
        if seq != self._recv_seq:  # R4
            if seq < self._recv_seq:
                raise ControlError(f"replayed frame (sequence {seq}, expected {self._recv_seq})")
            raise ControlError(f"frame out of order (sequence {seq}, expected {self._recv_seq})")
        try:
            msg = decode_payload(type_code, memoryview(frame)[_LENGTH.size + _HEADER.size:body_end])
        except PayloadError as exc:
            raise ControlError(f"malformed frame {seq}: {exc}") from None
        if first != isinstance(msg, Hello):  # R6: Hello first, and only once
            raise ControlError("expected the peer's Hello first" if first
                               else "a second Hello on the same connection")
        if self.peer_role not in SENDERS[type(msg)]:  # R6
            raise ControlError(f"a {self.peer_role} may not send {type(msg).__name__}")
        self._recv_seq += 1
        if first:
            self._accept_hello(msg)
        else:
            self.authenticated = True
        return msg

    def _accept_hello(self, hello: Hello) -> None:
        if hello.role != self.peer_role:  # R6: a reflected Hello claims our own role
            raise ControlError(f"peer says it is a {hello.role!r}, expected a {self.peer_role!r}")
        if len(hello.nonce) != NONCE_SIZE:
            raise ControlError(f"peer's nonce is {len(hello.nonce)} bytes, expected {NONCE_SIZE}")
        if hmac.compare_digest(hello.nonce, self.nonce):  # R6: our own nonce echoed back
            raise ControlError("peer's nonce equals ours (a reflected Hello)")
        self.peer_hello = hello
        # R3: keys for everything after the Hellos, bound to both fresh nonces and the direction.
        self._send_key = _MacKey(_derive(self._key, _LABEL_DATA, self.role.encode(), self.nonce, hello.nonce))
        self._recv_key = _MacKey(_derive(self._key, _LABEL_DATA, self.peer_role.encode(), hello.nonce,
                                         self.nonce))
