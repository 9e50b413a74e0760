"""Blocking distcache client, with the flag semantics of the original libdistcache ``DC_CTX``.

Flags (combine with ``|``; they mean the same as the C ``DC_CTX_FLAG_*``):

``0``                    a new connection for every operation (what Apache's mod_socache_dc does)
``PERSISTENT``           one connection, opened by the constructor, used for every operation
``PERSISTENT_PIDCHECK``  reconnect when the process id changed (after ``fork()``), so a parent and
                         its children never share (and garble) one connection
``PERSISTENT_RETRY``     on a network error (connection closed or reset, write failure),
                         reconnect and resend the request once
``PERSISTENT_LATE``      do not connect in the constructor; connect on first use

Differences from the original, on purpose:

* Timeouts: ``timeout`` seconds bound the connect and each operation (send + whole reply).  The
  C client waits forever on a silent server.  A timeout raises :class:`DistcacheError` (the
  request may or may not have been applied), and is not retried: the server is alive but slow.
* After a failed operation the persistent connection is dropped and the next operation
  reconnects (the C client keeps using the dead connection and fails forever).
* After a fork with ``PERSISTENT_PIDCHECK`` the child reconnects once and then keeps its own
  connection (the C client forgets to record the new pid and reconnects on every operation).

Results (the same decisions as the C functions):

=========  =======================================================================
add        True for [0]; False when the server refused it ([101] id already stored,
           [100] [102] [103] [104] out of range, payload over 32768 bytes)
get        the session data; None for a miss (any reply shorter than 5 bytes, as the
           C client: [1] absent, [2] proxy lost the server)
remove     True for [0] (removed), False for [1] (absent)
has        True for [0], False for [1] (or any reply that is not one byte, as the C client)
=========  =======================================================================

Everything else raises :class:`DistcacheError`: the server cannot be reached, the connection
broke, a timeout, an empty reply (dc_client answers so while it has no server), ``[2]`` from
dc_client on add/remove/has, a reply with another uid or operation, a corrupt reply.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

from .address import Address, AddressError, connect_socket, parse_address
from .tls import ClientTls, describe_error
from .codec import (FRAME_HEADER, MAX_FRAME_DATA, MAX_MESSAGE, PROTO_LEVEL, Message, MessageReader,
                    Op, ProtocolError, Status, encode_add_payload, encode_message)

__all__ = ["DistcacheError", "DistcacheClient", "PERSISTENT", "PERSISTENT_PIDCHECK",
           "PERSISTENT_RETRY", "PERSISTENT_LATE", "next_uid"]

PERSISTENT = 1
PERSISTENT_PIDCHECK = 2
PERSISTENT_RETRY = 4
PERSISTENT_LATE = 8
_ALL_FLAGS = PERSISTENT | PERSISTENT_PIDCHECK | PERSISTENT_RETRY | PERSISTENT_LATE


class DistcacheError(Exception):
    """The one exception type of the distcache client APIs: the operation did not complete.

    ``str(e)`` is one line naming the address and what went wrong.
    """


# The C library numbers requests with one process-wide counter; so do we (wrapping at 2**32).
_uid_counter = itertools.count(1)


def next_uid() -> int:
    uid = next(_uid_counter) & 0xFFFFFFFF
    return uid or (next(_uid_counter) & 0xFFFFFFFF)


_pack_header = FRAME_HEADER.pack
_TIMEVAL = struct.Struct("ll")


def encode_request(uid: int, op: int, payload: bytes) -> bytes:
    """A request message (fast path for the common single-frame case)."""
    if len(payload) <= MAX_FRAME_DATA:
        return _pack_header(PROTO_LEVEL, 0, uid, 0, op, 1, len(payload)) + payload
    return encode_message(Message(False, uid, Op(op), payload))


class DistcacheClient:
    """A blocking client for one cache address (dc_server, dc_client or anything speaking 0x11).

    >>> c = DistcacheClient("UNIX:/tmp/scache", PERSISTENT | PERSISTENT_RETRY, timeout=0.5)
    >>> c.add(b"session-id", b"session data", 300000)
    True
    >>> c.get(b"session-id")
    b'session data'
    """

    def __init__(self, address: str, flags: int = 0, timeout: float = 5.0, tls: ClientTls | None = None) -> None:
        if flags & ~_ALL_FLAGS:
            raise ValueError(f"unknown distcache client flags 0x{flags & ~_ALL_FLAGS:x}")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None to wait forever, as the original)")
        try:
            self._addr: Address = parse_address(address)
        except AddressError as exc:
            raise DistcacheError(str(exc)) from None
        if self._addr.kind == "ip" and self._addr.host is None:
            raise DistcacheError(f"cannot connect to '{address}': IP:port is a listen-only address")
        self.address = address
        self.flags = flags
        self.timeout = timeout
        # Extension: TLS (tcpha.distcache.tls.ClientTls); a certificate that does not check out
        # fails the connect like an unreachable server.
        self.tls = tls
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        # Rule (DC_CTX_new): connect now only if PERSISTENT and not PERSISTENT_LATE.
        if flags & PERSISTENT and not flags & PERSISTENT_LATE:
            self._sock = self._connect()

    # -- public API ------------------------------------------------------------

    def add(self, session_id: bytes, data: bytes, timeout_ms: int) -> bool:
        """Store ``data`` under ``session_id`` for ``timeout_ms`` milliseconds."""
        _check_id(session_id)
        if not data:
            raise ValueError("session data must not be empty")
        if not 0 <= timeout_ms <= 0xFFFFFFFF:
            raise ValueError(f"timeout {timeout_ms} ms does not fit in 32 bits")
        payload = encode_add_payload(session_id, data, timeout_ms)
        if len(payload) > MAX_MESSAGE:
            return False  # Rule (DC_CTX_add_session): too big to send -> failure, nothing sent.
        reply = self._transact(Op.ADD, payload)
        if len(reply) == 1:
            if reply[0] == Status.OK:
                return True
            if reply[0] == Status.DISCONNECTED:
                raise DistcacheError(f"{self.address}: the proxy has lost its cache server")
            return False
        raise DistcacheError(f"{self.address}: unexpected ADD reply of {len(reply)} bytes")

    def get(self, session_id: bytes) -> bytes | None:
        """The data stored under ``session_id``, or None when absent."""
        _check_id(session_id)
        reply = self._transact(Op.GET, bytes(session_id))
        # Rule (DC_CTX_get_session): a reply shorter than 5 bytes is a miss.
        if len(reply) < 5:
            return None
        return reply

    def remove(self, session_id: bytes) -> bool:
        """Remove ``session_id``; True if it was there."""
        _check_id(session_id)
        reply = self._transact(Op.REMOVE, bytes(session_id))
        if len(reply) == 1 and reply[0] in (Status.OK, Status.NOTOK):
            return reply[0] == Status.OK
        if reply == bytes([Status.DISCONNECTED]):
            raise DistcacheError(f"{self.address}: the proxy has lost its cache server")
        raise DistcacheError(f"{self.address}: unexpected REMOVE reply {reply[:8].hex()}")

    def has(self, session_id: bytes) -> bool:
        """True if ``session_id`` is stored."""
        _check_id(session_id)
        reply = self._transact(Op.HAVE, bytes(session_id))
        # Rule (DC_CTX_has_session): a reply that is not one byte counts as "absent";
        # [0] present, [1] absent, any other byte is an error.
        if len(reply) != 1:
            return False
        if reply[0] == Status.OK:
            return True
        if reply[0] == Status.NOTOK:
            return False
        raise DistcacheError(f"{self.address}: HAVE answered with status {reply[0]}")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> "DistcacheClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    # -- internals -------------------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            sock = connect_socket(self._addr, self.timeout)
            if self.tls is not None:
                # An SSL socket keeps Python's timeout (kernel timeouts would surface as SSL errors).
                return self.tls.wrap(sock, self._addr)
            if self.timeout is not None:
                # Blocking socket with kernel send/receive timeouts: Python's settimeout() would
                # poll() before every send and recv.
                tv = _TIMEVAL.pack(int(self.timeout), int((self.timeout % 1) * 1e6))
                sock.settimeout(None)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            return sock
        except AddressError as exc:
            raise DistcacheError(str(exc)) from None
        except socket.timeout:
            raise DistcacheError(f"{self.address}: connect timed out after {self.timeout} s") from None
        except OSError as exc:
            raise DistcacheError(f"{self.address}: cannot connect: {describe_error(exc)}") from None

    def _transact(self, op: Op, payload: bytes) -> bytes:
        uid = next_uid()
        request = encode_request(uid, op, payload)
        flags = self.flags
        if not flags & PERSISTENT:
            sock = self._connect()
            try:
                return self._exchange(sock, request, uid, op)[0]
            except _NetworkError as exc:
                raise DistcacheError(str(exc)) from None
            finally:
                sock.close()
        if flags & PERSISTENT_PIDCHECK:
            pid = os.getpid()
            if pid != self._pid:
                # Rule: after a fork the child must not use the parent's connection.  Closing
                # our copy of the descriptor does not disturb the parent's connection.
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                self._pid = pid
        if self._sock is None:
            self._sock = self._connect()
        retried = False
        while True:
            try:
                reply, net_error = self._exchange(self._sock, request, uid, op)
                return reply
            except _NetworkError as exc:
                self.close()
                # Rule: PERSISTENT_RETRY reconnects and resends once after a network error.
                if retried or not flags & PERSISTENT_RETRY:
                    raise DistcacheError(str(exc)) from None
                retried = True
                self._sock = self._connect()
            except DistcacheError:
                self.close()
                raise

    def _exchange(self, sock: socket.socket, request: bytes, uid: int, op: Op) -> tuple[bytes, bool]:
        timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            sock.sendall(request)  # one send per message (the C decoder's split-frame bug)
        except (BlockingIOError, socket.timeout):  # SO_SNDTIMEO expired
            raise DistcacheError(f"{self.address}: send timed out after {timeout} s") from None
        except OSError as exc:
            raise _NetworkError(f"{self.address}: send failed: {exc.strerror or exc}") from None
        reader = MessageReader(expect_response=True)
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, socket.timeout):  # SO_RCVTIMEO expired
                raise DistcacheError(f"{self.address}: no reply within {timeout} s") from None
            except OSError as exc:
                raise _NetworkError(f"{self.address}: receive failed: {exc.strerror or exc}") from None
            if not data:
                raise _NetworkError(f"{self.address}: connection closed by the server")
            try:
                msgs = reader.feed(data)
            except ProtocolError as exc:
                raise DistcacheError(f"{self.address}: corrupt reply: {exc}") from None
            if msgs:
                msg = msgs[0]
                # Rule (int_transact): the reply must echo our uid and operation, and not be empty.
                if msg.uid != uid or msg.op != op or len(msgs) > 1 or reader.pending():
                    raise DistcacheError(
                        f"{self.address}: reply does not match the request (uid {msg.uid} != {uid} "
                        f"or operation {msg.op.name} != {op.name})")
                if not msg.payload:
                    raise DistcacheError(f"{self.address}: empty reply (the proxy has no cache server)")
                return msg.payload, False
            if deadline is not None and time.monotonic() >= deadline:
                raise DistcacheError(f"{self.address}: no complete reply within {timeout} s")


class _NetworkError(Exception):
    """The connection broke (internal: decides PERSISTENT_RETRY)."""


def _check_id(session_id: bytes) -> None:
    if not session_id:
        raise ValueError("session id must not be empty")
    if len(session_id) > MAX_MESSAGE:
        raise ValueError(f"session id of {len(session_id)} bytes exceeds {MAX_MESSAGE}")
