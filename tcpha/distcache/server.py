"""dc_server's I/O loop: a thin asyncio Protocol around the sans-I/O codec and a store.

* Requests on a connection are answered strictly in order; the replies produced
  by one read are joined and written with one ``transport.write`` (one send), so
  a C reader never sees a frame cut in its last 4 bytes by us.
* A corrupt frame, a wrong-direction frame, a version mismatch, an over-long
  message or an ADD payload under 8 bytes closes that one connection without a
  reply (the requests completed before it in the same read are answered first).
* Memory is bounded per connection: the decoder holds at most one partial
  message (<= 16 frames); replies are held back (and reading paused) once the
  transport's write buffer passes ``write_limit``; a connection holding part of
  a message and sending nothing for ``stall_timeout`` seconds is closed.
* A store with ``is_async = True`` (the Redis backend) is awaited, one request
  at a time per connection, still in order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import sys
import time
from typing import Any, TextIO

from .codec import (Message, MessageReader, ProtocolError, Status, check_add_payload,
                    encode_response, parse_single_request)

__all__ = ["DistcacheServer", "progress_line"]

log = logging.getLogger("tcpha.distcache.server")

_NOTOK = b"\x01"
_OK = b"\x00"
_STATUS_BYTES = {int(s): bytes([int(s)]) for s in Status}


def progress_line(ops: int, delta: int, total: int, prev_total: int) -> str:
    """The original's progress line:
    ``Info, total operations = %7lu  (+ %5lu), total sessions = %5u  (%c%3u)``."""
    sign = "+" if total > prev_total else ("=" if total == prev_total else "-")
    return ("Info, total operations = %7d  (+ %5d), total sessions = %5d  (%c%3d)\n"
            % (ops, delta, total, sign, abs(total - prev_total)))


class DistcacheServer:
    """Serves the distcache protocol from ``store`` on one or more listening sockets."""

    def __init__(self, store: Any, *, progress: int = 0, stall_timeout: float = 30.0,
                 write_limit: int = 64 * 1024, progress_out: TextIO | None = None,
                 persist: Any = None, persist_interval_ms: int = 1000,
                 show_progress: bool = True, dc: str | None = None) -> None:
        self.store = store
        self.dc = dc                       # extension: our data center, shown in the progress line
        self.is_async = bool(getattr(store, "is_async", False))
        self.progress = progress
        self.stall_timeout = stall_timeout
        self.write_limit = write_limit
        self.progress_out = progress_out
        self.show_progress = show_progress
        self.persist = persist
        self.persist_interval = persist_interval_ms / 1000.0
        self.ops = 0                       # requests that got a reply (the original's counter)
        self.connections: set[_Connection] = set()
        self.partial: set[_Connection] = set()   # connections holding part of a message
        self.closed_protocol = 0           # connections closed for a protocol error
        self.closed_stalled = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task] = []
        self._stopped: asyncio.Event | None = None
        # progress-line state (as the C loop keeps it)
        self._last_print = 0.0
        self._last_ops = 0
        self._last_total = 0

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        """Serve on ``sock``; with ``tls`` (tcpha.distcache.tls.server_context), TLS only: a
        connection whose handshake fails (a plaintext client, a refused client certificate) is
        closed without an answer."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        sock.setblocking(False)
        # A handshake gets as long as a message may stall (-stall), not asyncio's 60 s.
        extra = {"ssl": tls, "ssl_handshake_timeout": self.stall_timeout} if tls is not None else {}
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(lambda: _Connection(self), sock=sock, backlog=1024, **extra)
        else:
            srv = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024, **extra)
        self._servers.append(srv)
        if not self._tasks:
            self._last_print = loop.time()
            self._tasks.append(loop.create_task(self._ticker()))
            if self.persist is not None:
                self._tasks.append(loop.create_task(self._flusher()))

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.transport.abort()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self.persist is not None:
            self.persist.close()
        if self._stopped is not None:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    # -- periodic work ----------------------------------------------------------------

    async def _ticker(self) -> None:
        """Every half second (the C loop's select timeout): stalled connections, progress line."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.5)
            now = loop.time()
            if self.partial:
                limit = now - self.stall_timeout
                for conn in [c for c in self.partial if c.last_rx < limit]:
                    log.debug("closing a connection that sent part of a message and stalled for %.0f s",
                             self.stall_timeout)
                    self.closed_stalled += 1
                    conn.transport.abort()
                    self.partial.discard(conn)
            if self.show_progress:
                await self._progress_tick(now)

    async def _progress_tick(self, now: float) -> None:
        # The original: within a second of the last line, print only if a -progress
        # counter was tripped; otherwise print when the stored count (or the tripped
        # counter) changed.
        ops = self.ops
        progress = self.progress
        tripped = bool(progress) and ops // progress != self._last_ops // progress
        if now - self._last_print < 1.0 and not tripped:
            return
        total = await self._count()
        if total == self._last_total and not tripped:
            return
        self._emit(now, ops, total)

    def _emit(self, now: float, ops: int, total: int) -> None:
        line = progress_line(ops, ops - self._last_ops, total, self._last_total)
        if self.dc is not None:
            line = line[:-1] + f", dc = {self.dc}\n"
        out = self.progress_out or sys.stderr
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):
            pass
        self._last_print = now
        self._last_ops = ops
        self._last_total = total

    def check_progress_counter(self) -> None:
        """Called after each batch when -progress N is set: print at once when tripped."""
        ops = self.ops
        if ops // self.progress != self._last_ops // self.progress and not self.is_async:
            self.store.expire()
            self._emit(asyncio.get_running_loop().time(), ops, len(self.store))

    async def emit_now(self) -> None:
        """The progress line at once (dc_server's SIGHUP), whether or not anything changed."""
        self._emit(asyncio.get_running_loop().time(), self.ops, await self._count())

    async def _count(self) -> int:
        store = self.store
        if self.is_async:
            refresh = getattr(store, "refresh_count", None)
            if refresh is not None:
                return int(await refresh())
            return len(store)
        store.expire()
        return len(store)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.persist_interval)
            try:
                self.persist.flush()
            except Exception:  # never let the persistence kill the server
                log.exception("persist flush failed")

    # -- request handling ----------------------------------------------------------------

    def handle(self, msg: Message) -> bytes:
        """Answer one request with the (sync) store; returns the encoded reply.
        Raises ProtocolError for an ADD payload under 8 bytes (close, no reply)."""
        return self.answer(msg.uid, msg.op, msg.payload)

    def answer(self, uid: int, op: int, payload: bytes) -> bytes:
        store = self.store
        if op == 1:      # GET: the raw data, or [1] when absent
            data = store.get(payload)
            reply = _NOTOK if data is None else data
        elif op == 3:    # HAVE: [0] present, [1] absent
            reply = _OK if store.has(payload) else _NOTOK
        elif op == 2:    # REMOVE: [0] removed, [1] absent
            reply = _OK if store.remove(payload) else _NOTOK
        else:            # ADD: range checks in the original order, then the store (0 or 101)
            status, sid, data, timeout = check_add_payload(payload)
            if status == 0:
                status = store.add(sid, data, timeout)
            reply = _STATUS_BYTES[status]
        self.ops += 1
        return encode_response(uid, op, reply)

    async def handle_async(self, msg: Message) -> bytes:
        op = msg.op
        store = self.store
        payload = msg.payload
        if op == 1:
            data = await store.get(payload)
            reply = _NOTOK if data is None else data
        elif op == 3:
            reply = _OK if await store.has(payload) else _NOTOK
        elif op == 2:
            reply = _OK if await store.remove(payload) else _NOTOK
        else:
            status, sid, data, timeout = check_add_payload(payload)
            if status == 0:
                status = await store.add(sid, data, timeout)
            reply = _STATUS_BYTES[int(status)]
        self.ops += 1
        return encode_response(msg.uid, op, reply)


class _Connection(asyncio.Protocol):
    __slots__ = ("server", "transport", "reader", "last_rx", "backlog", "paused_writing",
                 "task", "closing", "_time", "is_partial", "fast")

    def __init__(self, server: DistcacheServer) -> None:
        self.server = server
        self.reader = MessageReader(expect_response=False)
        self.last_rx = 0.0
        self.backlog: collections.deque[Message] = collections.deque()
        self.paused_writing = False
        self.task: asyncio.Task | None = None
        self.closing = False
        self.is_partial = False
        self.fast = not server.is_async
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._time = asyncio.get_running_loop().time
        transport.set_write_buffer_limits(high=self.server.write_limit)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.server.partial.discard(self)
        self.backlog.clear()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.paused_writing = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.closing:
            return
        if self.server.is_async:
            self.transport.resume_reading()
            return
        self._run_backlog()
        if not self.paused_writing and not self.backlog:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if (self.fast and not reader._buf and not reader._parts and not self.backlog
                and not self.paused_writing and not self.closing):
            # The common case -- one whole single-frame request -- without Message objects.
            one = parse_single_request(data)
            if one is not None:
                try:
                    self.transport.write(self.server.answer(*one))
                except ProtocolError as exc:
                    self._protocol_error(exc)
                    return
                if self.server.progress:
                    self.server.check_progress_counter()
                return
        error: ProtocolError | None = None
        try:
            msgs = reader.feed(data)
        except ProtocolError as exc:
            msgs = exc.messages
            error = exc
        server = self.server
        if reader._buf or reader._parts:
            # Part of a message is held: remember when data last came (stall check).
            self.last_rx = self._time()
            if not self.is_partial:
                self.is_partial = True
                server.partial.add(self)
        elif self.is_partial:
            self.is_partial = False
            server.partial.discard(self)
        if server.is_async:
            self.backlog.extend(msgs)
            if error is not None:
                self.backlog.append(error)  # type: ignore[arg-type]  # close when reached
            if self.task is None and self.backlog:
                self.task = asyncio.get_running_loop().create_task(self._run_async())
            if len(self.backlog) > 256:
                self.transport.pause_reading()
            return
        if msgs:
            if self.backlog or self.paused_writing:
                self.backlog.extend(msgs)
            elif len(msgs) == 1 and error is None:
                try:
                    self.transport.write(server.handle(msgs[0]))
                except ProtocolError as exc:
                    self._protocol_error(exc)
                    return
            else:
                self.backlog.extend(msgs)
                self._run_backlog()
        if error is not None:
            if self.backlog:
                self.backlog.append(error)  # type: ignore[arg-type]
            elif not self.closing:
                self._protocol_error(error)
        elif server.progress:
            server.check_progress_counter()

    def _run_backlog(self) -> None:
        handle = self.server.handle
        out: list[bytes] = []
        size = 0
        backlog = self.backlog
        while backlog and not self.paused_writing:
            item = backlog.popleft()
            if isinstance(item, ProtocolError):
                if out:
                    self.transport.write(b"".join(out))
                self._protocol_error(item)
                return
            try:
                reply = handle(item)
            except ProtocolError as exc:
                if out:
                    self.transport.write(b"".join(out))
                self._protocol_error(exc)
                return
            out.append(reply)
            size += len(reply)
            if size > self.server.write_limit:
                self.transport.write(b"".join(out))
                out = []
                size = 0
        if out:
            self.transport.write(b"".join(out))

    async def _run_async(self) -> None:
        # A store that declares ``issues_in_order`` (the Redis store: its commands are queued in the order
        # the calls are made and go down one connection per shard) gets the requests waiting on this
        # connection together, so a client that pipelines -- dc_client carries every local client on one
        # upstream connection -- is not held to one Redis round trip per request. Replies are written in
        # request order either way; any other async store is awaited one request at a time.
        backlog = self.backlog
        handle = self.server.handle_async
        limit = 256 if getattr(self.server.store, "issues_in_order", False) else 1
        try:
            while backlog and not self.closing:
                batch: list[Message] = []
                failed: ProtocolError | None = None
                while backlog and len(batch) < limit:
                    item = backlog.popleft()
                    if isinstance(item, ProtocolError):
                        failed = item
                        break
                    batch.append(item)
                if len(batch) == 1:
                    results: list = []
                    try:
                        results.append(await handle(batch[0]))
                    except ProtocolError as exc:
                        results.append(exc)
                else:
                    results = await asyncio.gather(*(handle(m) for m in batch), return_exceptions=True)
                if self.closing:
                    return
                out = []
                for result in results:
                    if isinstance(result, ProtocolError):
                        failed = result
                        break
                    if isinstance(result, BaseException):
                        raise result
                    out.append(result)
                if out:
                    self.transport.write(out[0] if len(out) == 1 else b"".join(out))
                if failed is not None:
                    self._protocol_error(failed)
                    return
                if len(backlog) < 64 and not self.paused_writing:
                    self.transport.resume_reading()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("backend failure; closing the connection")
            self.transport.abort()
        finally:
            self.task = None

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.debug("closing a connection: %s", exc)
        self.server.closed_protocol += 1
        self.closing = True
        self.backlog.clear()
        self.server.partial.discard(self)
        # close(), not abort(): replies already produced still go out, nothing more is read.
        self.transport.close()


def now_ms() -> int:
    return int(time.time() * 1000)
