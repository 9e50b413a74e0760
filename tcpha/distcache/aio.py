"""asyncio distcache client: one connection, many requests in flight, answers matched by uid.

    client = await AsyncDistcacheClient.connect("IP:127.0.0.1:9001", timeout=1.0)
    ok = await client.add(b"id", b"data", 300000)
    results = await asyncio.gather(*(client.get(k) for k in keys))   # pipelined
    await client.close()

``add/get/remove/has`` are awaitables with the results and failures of the blocking
:class:`~tcpha.distcache.client.DistcacheClient` (same decisions, same :class:`DistcacheError`).
They are plain methods returning a future rather than ``async def`` so that a pipelined batch
costs no Task per request; ``await`` them like coroutines.

Each request is written at once (requests queued in the same event-loop turn go out in one
write) and answered when the reply with its uid arrives.  A request gets ``DistcacheError`` when
``timeout`` seconds pass without its reply (the connection stays usable: a late reply is
dropped), or when the connection breaks (every request in flight fails; the client is then
closed and a new one must be made).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable

from .address import Address, AddressError, parse_address
from .client import DistcacheError, _check_id
from .tls import ClientTls, describe_error
from .codec import (FRAME_HEADER, MAX_FRAME_DATA, MAX_MESSAGE, PROTO_LEVEL, Message, MessageReader,
                    Op, ProtocolError, Status, encode_add_payload, encode_message)

__all__ = ["AsyncDistcacheClient", "open_address"]

_pack_header = FRAME_HEADER.pack
_unpack_header = FRAME_HEADER.unpack_from
_OK = Status.OK
_NOTOK = Status.NOTOK
_DISC = Status.DISCONNECTED

# What to make of a reply payload, per operation (the C client's decisions, see client.py).
_ADD, _GET, _REMOVE, _HAVE = 0, 1, 2, 3


async def open_address(addr: Address, protocol_factory, timeout: float | None, tls: "ClientTls | None" = None):
    """Open a stream connection to a distcache address with an asyncio protocol; with ``tls``,
    over TLS (the handshake, and the server's certificate check, are part of the connect: a
    certificate that does not check out raises ssl.SSLError, an OSError)."""
    loop = asyncio.get_running_loop()
    extra: dict = {}
    if tls is not None:
        ctx, name = tls.for_address(addr)
        extra = {"ssl": ctx, "server_hostname": name}
    if addr.kind == "unix":
        coro = loop.create_unix_connection(protocol_factory, addr.path, **extra)
    elif addr.kind == "fd":
        if len(addr.fds) == 2 and addr.fds[0] != addr.fds[1]:
            raise AddressError(f"cannot use '{addr.text}' as one socket: it names two descriptors")
        sock = socket.socket(fileno=addr.fds[0])
        sock.setblocking(False)
        coro = loop.create_connection(protocol_factory, sock=sock, **extra)
    else:
        if addr.host is None:
            raise AddressError(f"cannot connect to '{addr.text}': IP:port is a listen-only address, give a host")
        family = socket.AF_INET6 if addr.ipv6 else socket.AF_INET
        coro = loop.create_connection(protocol_factory, addr.host, addr.port, family=family, **extra)
    if timeout is None:
        return await coro
    return await asyncio.wait_for(coro, timeout)


class _Batch:
    __slots__ = ("fut", "kind", "first", "n", "left", "results", "deadline")

    def __init__(self, fut: asyncio.Future, kind: int, first: int, n: int, deadline: float) -> None:
        self.fut = fut
        self.kind = kind
        self.first = first
        self.n = n
        self.left = n
        self.results: list = [None] * n
        self.deadline = deadline


class _ClientProtocol(asyncio.Protocol):
    __slots__ = ("client",)

    def __init__(self, client: "AsyncDistcacheClient") -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client._data(data)

    def connection_lost(self, exc) -> None:
        self.client._lost(exc)

    def pause_writing(self) -> None:
        self.client._paused = True

    def resume_writing(self) -> None:
        self.client._paused = False
        waiter = self.client._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AsyncDistcacheClient:
    """A pipelined asyncio client (create it with ``await AsyncDistcacheClient.connect(...)``)."""

    def __init__(self, address: str, timeout: float | None = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = MessageReader(expect_response=True)
        # uid -> (future, operation, deadline)
        self._pending: dict[int, tuple[asyncio.Future, int, float]] = {}
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._uid = 0
        self._closed = False
        self._error: str | None = None
        self._paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._slow = False
        self._rest = b""
        self._batches: list[_Batch] = []

    @classmethod
    async def connect(cls, address: str, timeout: float | None = 5.0,
                      tls: ClientTls | None = None) -> "AsyncDistcacheClient":
        try:
            addr = parse_address(address)
        except AddressError as exc:
            raise DistcacheError(str(exc)) from None
        self = cls(address, timeout)
        try:
            transport, _ = await open_address(addr, lambda: _ClientProtocol(self), timeout, tls)
        except AddressError as exc:
            raise DistcacheError(str(exc)) from None
        except asyncio.TimeoutError:
            raise DistcacheError(f"{address}: connect timed out after {timeout} s") from None
        except OSError as exc:
            raise DistcacheError(f"{address}: cannot connect: {describe_error(exc)}") from None
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    # -- public API (awaitables) -------------------------------------------------

    def add(self, session_id: bytes, data: bytes, timeout_ms: int) -> Awaitable[bool]:
        _check_id(session_id)
        if not data:
            raise ValueError("session data must not be empty")
        payload = encode_add_payload(session_id, data, timeout_ms)
        if len(payload) > MAX_MESSAGE:
            fut = self._loop.create_future()
            fut.set_result(False)
            return fut
        return self._request(_ADD, payload)

    def get(self, session_id: bytes) -> Awaitable[bytes | None]:
        if session_id.__class__ is not bytes:
            session_id = bytes(session_id)
        if not session_id or len(session_id) > MAX_MESSAGE:
            _check_id(session_id)
        return self._request(_GET, session_id)

    def remove(self, session_id: bytes) -> Awaitable[bool]:
        if session_id.__class__ is not bytes:
            session_id = bytes(session_id)
        if not session_id or len(session_id) > MAX_MESSAGE:
            _check_id(session_id)
        return self._request(_REMOVE, session_id)

    def has(self, session_id: bytes) -> Awaitable[bool]:
        if session_id.__class__ is not bytes:
            session_id = bytes(session_id)
        if not session_id or len(session_id) > MAX_MESSAGE:
            _check_id(session_id)
        return self._request(_HAVE, session_id)

    # Batches: many requests written at once and one awaitable for all the answers (a list in
    # request order).  Cheaper per request than one future each; the requests are still
    # pipelined on the connection and the answers matched by uid.  The first failing request
    # fails the whole batch with DistcacheError.

    def get_many(self, session_ids: list[bytes]) -> Awaitable[list[bytes | None]]:
        return self._request_many(_GET, [bytes(i) for i in session_ids])

    def has_many(self, session_ids: list[bytes]) -> Awaitable[list[bool]]:
        return self._request_many(_HAVE, [bytes(i) for i in session_ids])

    def remove_many(self, session_ids: list[bytes]) -> Awaitable[list[bool]]:
        return self._request_many(_REMOVE, [bytes(i) for i in session_ids])

    def add_many(self, items: list[tuple[bytes, bytes, int]]) -> Awaitable[list[bool]]:
        payloads = []
        for sid, data, timeout_ms in items:
            _check_id(sid)
            if not data:
                raise ValueError("session data must not be empty")
            payload = encode_add_payload(sid, data, timeout_ms)
            if len(payload) > MAX_MESSAGE:
                raise ValueError(f"session of {len(payload)} bytes exceeds the {MAX_MESSAGE}-byte message")
            payloads.append(payload)
        return self._request_many(_ADD, payloads)

    def _request_many(self, kind: int, payloads: list[bytes]) -> asyncio.Future:
        fut = self._loop.create_future()
        n = len(payloads)
        if self._closed:
            fut.set_exception(DistcacheError(f"{self.address}: {self._error or 'client closed'}"))
            return fut
        if not n:
            fut.set_result([])
            return fut
        for p in payloads:
            if not p:
                raise ValueError("session id must not be empty")
        first = (self._uid + 1) & 0xFFFFFFFF
        parts = []
        uid = first
        for p in payloads:
            if len(p) <= MAX_FRAME_DATA:
                parts.append(_pack_header(PROTO_LEVEL, 0, uid, 0, kind, 1, len(p)) + p)
            else:
                parts.append(encode_message(Message(False, uid, Op(kind), p)))
            uid = (uid + 1) & 0xFFFFFFFF
        self._uid = (first + n - 1) & 0xFFFFFFFF
        self._out.append(b"".join(parts))
        deadline = 0.0
        if self.timeout is not None:
            deadline = time.monotonic() + self.timeout
            if self._timer is None:
                self._timer = self._loop.call_later(self.timeout, self._check_timeouts)
        self._batches.append(_Batch(fut, kind, first, n, deadline))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        self._flush()
        while self._paused and not self._closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    async def close(self) -> None:
        self._fail_all("client closed")
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> "AsyncDistcacheClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------

    def _request(self, kind: int, payload: bytes) -> asyncio.Future:
        fut = self._loop.create_future()
        if self._closed:
            fut.set_exception(DistcacheError(f"{self.address}: {self._error or 'client closed'}"))
            return fut
        uid = self._uid = (self._uid + 1) & 0xFFFFFFFF
        n = len(payload)
        if n <= MAX_FRAME_DATA:
            self._out.append(_pack_header(PROTO_LEVEL, 0, uid, 0, kind, 1, n) + payload)
        else:
            self._out.append(encode_message(Message(False, uid, Op(kind), payload)))
        deadline = 0.0
        if self.timeout is not None:
            deadline = time.monotonic() + self.timeout
            if self._timer is None:
                self._timer = self._loop.call_later(self.timeout, self._check_timeouts)
        self._pending[uid] = (fut, kind, deadline)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None:
            data = b"".join(self._out)
            self._out.clear()
            self._transport.write(data)

    def _data(self, data: bytes) -> None:
        # Fast path (hand-written for speed; the codec's MessageReader does the general case):
        # whole single-frame responses are parsed here straight from the buffer.  The first
        # frame that is not one (a multi-frame message, or anything the codec should judge)
        # sends this and every later chunk through the MessageReader until it holds nothing.
        if self._slow:
            self._feed_reader(data)
            return
        if self._rest:
            data = self._rest + data
            self._rest = b""
        end = len(data)
        pos = 0
        resolve = self._resolve
        while end - pos >= 14:
            level, is_resp, uid, op_class, op, complete, dlen = _unpack_header(data, pos)
            if complete != 1 or level >> 16 != 0x11 or is_resp != 1 or op_class or op > 3 \
                    or dlen > MAX_FRAME_DATA:
                self._slow = True
                self._feed_reader(data[pos:])
                return
            stop = pos + 14 + dlen
            if stop > end:
                break
            resolve(uid, op, data[pos + 14:stop])
            pos = stop
        if pos < end:
            self._rest = data[pos:]

    def _feed_reader(self, data: bytes) -> None:
        try:
            msgs = self._reader.feed(data)
        except ProtocolError as exc:
            self._fail_all(f"corrupt reply: {exc}")
            return
        if not self._reader.pending():
            self._slow = False
        for msg in msgs:
            self._resolve(msg.uid, msg.op, msg.payload)

    def _resolve(self, uid: int, op: int, payload: bytes) -> None:
        entry = self._pending.pop(uid, None)
        if entry is not None:
            fut = entry[0]
            if fut.done():
                return
            if op == _GET and entry[1] == _GET and len(payload) >= 5:
                fut.set_result(payload)        # a GET hit: _decide's first answer, without the call
                return
            ok, value = self._decide(uid, entry[1], op, payload)
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
            return
        for batch in self._batches:
            idx = (uid - batch.first) & 0xFFFFFFFF
            if idx < batch.n:
                fut = batch.fut
                if fut.done():
                    return
                if op == _GET and batch.kind == _GET and len(payload) >= 5:
                    ok, value = True, payload
                else:
                    ok, value = self._decide(uid, batch.kind, op, payload)
                if not ok:
                    fut.set_exception(value)
                    self._batches.remove(batch)
                    return
                batch.results[idx] = value
                batch.left -= 1
                if not batch.left:
                    fut.set_result(batch.results)
                    self._batches.remove(batch)
                return
        # else: the reply of a request that timed out

    def _decide(self, uid: int, kind: int, op: int, payload: bytes):
        """(True, result) or (False, DistcacheError): the blocking client's decisions."""
        if op != kind:
            return False, DistcacheError(f"{self.address}: reply for uid {uid} has operation "
                                         f"{Op(op).name}, not {Op(kind).name}")
        if not payload:
            return False, DistcacheError(f"{self.address}: empty reply (the proxy has no cache server)")
        if kind == _GET:
            return True, (payload if len(payload) >= 5 else None)
        if len(payload) == 1:
            status = payload[0]
            if status == _OK:
                return True, True
            if status == _NOTOK:
                return True, False
            if status == _DISC:
                return False, DistcacheError(f"{self.address}: the proxy has lost its cache server")
            if kind == _ADD:
                return True, False
            return False, DistcacheError(f"{self.address}: {Op(kind).name} answered with status {status}")
        if kind == _HAVE:
            return True, False
        return False, DistcacheError(f"{self.address}: unexpected {Op(kind).name} reply of {len(payload)} bytes")

    def _check_timeouts(self) -> None:
        self._timer = None
        if (not self._pending and not self._batches) or self.timeout is None:
            return
        now = time.monotonic()
        expired = []
        next_due = None
        for uid, (fut, _, deadline) in self._pending.items():
            if deadline <= now:
                expired.append(uid)
            else:
                next_due = deadline  # dict order == send order == deadline order
                break
        for uid in expired:
            fut = self._pending.pop(uid)[0]
            if not fut.done():
                fut.set_exception(DistcacheError(f"{self.address}: no reply within {self.timeout} s"))
        for batch in list(self._batches):
            if batch.deadline <= now:
                self._batches.remove(batch)
                if not batch.fut.done():
                    batch.fut.set_exception(DistcacheError(f"{self.address}: no reply within {self.timeout} s"))
            elif next_due is None or batch.deadline < next_due:
                next_due = batch.deadline
        if next_due is not None:
            self._timer = self._loop.call_later(max(next_due - now, 0.001), self._check_timeouts)

    def _lost(self, exc) -> None:
        self._transport = None
        self._fail_all("connection closed by the server" if exc is None else f"connection lost: {exc}")

    def _fail_all(self, why: str) -> None:
        if not self._closed:
            self._closed = True
            self._error = why
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        futs = [entry[0] for entry in pending.values()] + [b.fut for b in self._batches]
        self._batches = []
        for fut in futs:
            if not fut.done():
                fut.set_exception(DistcacheError(f"{self.address}: {why}"))
        if self._transport is not None and why != "client closed":
            self._transport.close()
            self._transport = None
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
