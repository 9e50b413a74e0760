"""dc_snoop: a transparent distcache proxy that prints one trace line per frame.

For every accepted client connection the snooper opens a connection to the server and copies
the traffic both ways, frame by frame: a frame is forwarded once it has fully arrived, and at
that moment one line goes to stderr (the original's format and stream)::

    SNOOP_DBG_MSG: connection %d, %s, message completed (request_uid = %lu), total_len=%d

``connection`` counts the proxied connections from 0 (a global counter, never reused; a client
whose server connection fails gets no number, as in the original), ``%s`` is ``client->server`` or ``server->client``, ``request_uid`` is the frame's
uid and ``total_len`` is the frame's length on the wire (14 + data_len).  A message of several
frames gives several lines (the original's "message" is a frame).

Like the original, the only check is the frame length: a data_len above 2048 drops that
connection pair, with the original's two lines::

    SNOOP_DBG_MSG: connection %d, %s, message has illegal 'data_len' (%d)
    [TODO: change me] client->server error

(``server->client`` in the second line for the other direction).  Everything else passes through unchanged, so the snooper can sit between any
two compliant tools.

Extension ``-decode``: each line gets ``, op=OP, id=HEX, data_len=N, status=S`` fields decoded
from the whole message (on its last frame): the operation; for requests the session id (hex,
at most 16 bytes shown, then ``...``), for ADD also the data length and timeout; for responses
the status byte name or the data length of a GET answer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import sys

from .address import Address, AddressError
from .aio import open_address
from .tls import ClientTls, describe_error
from .codec import FRAME_HEADER, MAX_FRAME_DATA, Op, Status

__all__ = ["Snooper", "decode_fields"]

log = logging.getLogger("tcpha.distcache.snoop")

HEADER_LEN = FRAME_HEADER.size
_unpack_header = FRAME_HEADER.unpack_from
_ADD_HEAD = struct.Struct(">II")
ID_SHOWN = 16


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"UNKNOWN({op})"


def _hex_id(sid: bytes) -> str:
    return sid[:ID_SHOWN].hex() + ("..." if len(sid) > ID_SHOWN else "")


def decode_fields(is_response: int, op: int, payload: bytes) -> str:
    """The ``-decode`` extension fields for one whole message."""
    name = _op_name(op)
    if not is_response:
        if op == Op.ADD:
            if len(payload) < 8:
                return f", op={name}, id=?, data_len=?, status=corrupt ({len(payload)} bytes)"
            timeout, idlen = _ADD_HEAD.unpack_from(payload, 0)
            sid = payload[8:8 + idlen]
            dlen = max(0, len(payload) - 8 - idlen)
            return f", op={name}, id={_hex_id(sid)}, data_len={dlen}, timeout={timeout}ms"
        return f", op={name}, id={_hex_id(payload)}, data_len=0"
    if op == Op.GET and len(payload) >= 5:
        return f", op={name}, data_len={len(payload)}, status=found"
    if len(payload) == 1:
        try:
            status = Status(payload[0]).name
        except ValueError:
            status = str(payload[0])
        return f", op={name}, data_len=0, status={status}"
    if not payload:
        return f", op={name}, data_len=0, status=empty (proxy has no server)"
    return f", op={name}, data_len={len(payload)}, status=?"


class _Direction:
    """Frame splitter for one direction of one proxied pair (no I/O)."""

    __slots__ = ("name", "buf", "parts")

    def __init__(self, name: str) -> None:
        self.name = name
        self.buf = bytearray()
        self.parts: list[bytes] = []   # -decode: data of the unfinished message


class _Pair:
    def __init__(self, snooper: "Snooper") -> None:
        self.snooper = snooper
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.c2s = _Direction("client->server")
        self.s2c = _Direction("server->client")
        self.closed = False
        self.early: list[bytes] = []  # client bytes that arrived before the server connection
        self._number = -1

    @property
    def number(self) -> int:
        """This pair's number in the trace, taken from the global counter when its server
        connection is up (or its first frame is traced, whichever comes first)."""
        if self._number < 0:
            self._number = self.snooper.next_number()
        return self._number

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self in self.snooper.pairs:
            self.snooper.pairs.remove(self)
        for t in (self.client, self.server):
            if t is not None:
                t.close()

    def feed(self, d: _Direction, data: bytes, dest: asyncio.Transport | None) -> None:
        buf = d.buf
        buf += data
        pos = 0
        end = len(buf)
        lines = []
        decode = self.snooper.decode
        bad = False
        while end - pos >= HEADER_LEN:
            _, is_resp, uid, _, op, complete, dlen = _unpack_header(buf, pos)
            if dlen > MAX_FRAME_DATA:
                # Rule (original snooper): a data_len over the maximum drops the connection pair.
                lines.append(f"SNOOP_DBG_MSG: connection {self.number}, {d.name}, message has illegal "
                             f"'data_len' ({dlen})")
                lines.append(f"[TODO: change me] {d.name} error")
                bad = True
                break
            stop = pos + HEADER_LEN + dlen
            if stop > end:
                break
            line = (f"SNOOP_DBG_MSG: connection {self.number}, {d.name}, message completed "
                    f"(request_uid = {uid}), total_len={HEADER_LEN + dlen}")
            if decode:
                d.parts.append(bytes(buf[pos + HEADER_LEN:stop]))
                if complete:
                    line += decode_fields(is_resp, op, b"".join(d.parts))
                    d.parts = []
            lines.append(line)
            pos = stop
        if pos:
            out = bytes(buf[:pos])
            del buf[:pos]
            if dest is not None:
                dest.write(out)
            elif d is self.c2s:
                self.early.append(out)   # the server connection is not up yet
        self.snooper.emit(lines)
        if bad:
            self.close()


class _ClientSide(asyncio.Protocol):
    def __init__(self, snooper: "Snooper") -> None:
        self.snooper = snooper
        self.pair = _Pair(snooper)

    def connection_made(self, transport) -> None:
        self.pair.client = transport
        self.snooper.pairs.append(self.pair)
        transport.pause_reading()
        asyncio.ensure_future(self._connect_server())

    async def _connect_server(self) -> None:
        pair = self.pair
        try:
            transport, _ = await open_address(self.snooper.server, lambda: _ServerSide(pair), 10.0,
                                              self.snooper.tls)
        except (OSError, AddressError, asyncio.TimeoutError) as exc:
            # As the original: a client we cannot proxy is dropped, without a word on stderr (the
            # trace stays the original's; TCPHA_LOG_LEVEL=DEBUG shows why).
            if isinstance(exc, ssl.SSLError):
                # A certificate that does not check out is said (once per reason), not silent.
                why = describe_error(exc)
                if why != self.snooper.tls_failure:
                    self.snooper.tls_failure = why
                    log.warning("cannot connect to %s: %s", self.snooper.server.text, why)
            log.debug("cannot connect to %s: %s", self.snooper.server.text, exc)
            pair.close()
            return
        if pair.closed:
            transport.close()
            return
        pair.server = transport
        pair.number  # noqa: B018 (takes the number now: the connection is proxied)
        if pair.early:
            transport.write(b"".join(pair.early))
            pair.early.clear()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if pair.client is not None:
            pair.client.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.pair.feed(self.pair.c2s, data, self.pair.server)

    # Flow control: when the client does not read, stop reading from the server (and below,
    # the other way round), so that nothing piles up in the snooper.
    def pause_writing(self) -> None:
        if self.pair.server is not None:
            self.pair.server.pause_reading()

    def resume_writing(self) -> None:
        if self.pair.server is not None:
            self.pair.server.resume_reading()

    def connection_lost(self, exc) -> None:
        self.pair.client = None
        self.pair.close()


class _ServerSide(asyncio.Protocol):
    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def data_received(self, data: bytes) -> None:
        self.pair.feed(self.pair.s2c, data, self.pair.client)

    def pause_writing(self) -> None:
        if self.pair.client is not None:
            self.pair.client.pause_reading()

    def resume_writing(self) -> None:
        if self.pair.client is not None:
            self.pair.client.resume_reading()

    def connection_lost(self, exc) -> None:
        self.pair.server = None
        self.pair.close()


class Snooper:
    def __init__(self, listen: socket.socket, server: Address, *, decode: bool = False, out=None,
                 tls: ClientTls | None = None) -> None:
        self.listen_sock = listen
        self.server = server
        self.tls = tls          # extension: TLS to the server (the trace shows the plaintext)
        self.tls_failure = ""   # the last certificate failure logged
        self.decode = decode
        self.out = out if out is not None else sys.stderr
        self.pairs: list[_Pair] = []
        self._stopped: asyncio.Event | None = None
        self._numbers = 0

    def next_number(self) -> int:
        """The number of the next proxied connection: 0, 1, 2, ... for the whole run."""
        n = self._numbers
        self._numbers += 1
        return n

    def emit(self, lines: list[str]) -> None:
        if lines:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.listen_sock.setblocking(False)
        if self.listen_sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(lambda: _ClientSide(self), sock=self.listen_sock)
        else:
            srv = await loop.create_server(lambda: _ClientSide(self), sock=self.listen_sock)
        try:
            await self._stopped.wait()
        finally:
            srv.close()
            for pair in list(self.pairs):
                pair.close()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()
